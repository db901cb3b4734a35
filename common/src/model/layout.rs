//! Where each tensor lives in the flat parameter vector, and what it is called.
//!
//! Parameters, gradients and optimizer moments are flat `[T]` slices in one fixed order, so that
//! all-reduce, optimizer steps, checkpoints and the fingerprint are plain vector operations. The
//! order is: each linear layer's weight (`[out, in]`, row-major, as PyTorch's `nn.Linear`) followed
//! by its bias (`[out]`), layers in this order:
//!
//! | role                     | default model (one hidden layer) | general scheme        |
//! |--------------------------|----------------------------------|-----------------------|
//! | encoder hidden layer i   | `fc1`                            | `encoder.{i}`         |
//! | mean head                | `fc21`                           | `encoder.mu`          |
//! | log-variance head        | `fc22`                           | `encoder.logvar`      |
//! | decoder hidden layer i   | `fc3`                            | `decoder.{i}`         |
//! | decoder output layer     | `fc4`                            | `decoder.out`         |
//!
//! The one-hidden-layer names are those of the PyTorch VAE example, so its `load_state_dict`
//! accepts our `model.safetensors` unchanged. Tensor names are `{layer}.weight` and `{layer}.bias`.

use std::ops::Range;

use crate::model::ModelConfig;

/// Which part of the network a linear layer belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerRole {
    EncoderHidden(usize),
    Mu,
    LogVar,
    DecoderHidden(usize),
    DecoderOut,
}

/// One linear layer `y = x W^T + b` inside the flat vector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinearLayout {
    pub role: LayerRole,
    /// `fc1`, `encoder.0`, ...
    pub name: String,
    pub in_dim: usize,
    pub out_dim: usize,
    /// `W`, shape `[out_dim, in_dim]`, row-major.
    pub weight: Range<usize>,
    /// `b`, shape `[out_dim]`.
    pub bias: Range<usize>,
}

/// A named tensor in the flat vector, for files and reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorLayout {
    pub name: String,
    pub shape: Vec<usize>,
    pub range: Range<usize>,
}

/// The layout of every parameter of a model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamLayout {
    layers: Vec<LinearLayout>,
    len: usize,
}

impl ParamLayout {
    pub fn new(config: &ModelConfig) -> Self {
        let pytorch_names = config.hidden.len() == 1;
        let mut specs: Vec<(LayerRole, String, usize, usize)> = Vec::new();
        // Encoder: input -> hidden[0] -> ... -> hidden[n-1].
        let mut prev = config.input_dim;
        for (i, &h) in config.hidden.iter().enumerate() {
            let name = if pytorch_names {
                "fc1".to_string()
            } else {
                format!("encoder.{i}")
            };
            specs.push((LayerRole::EncoderHidden(i), name, prev, h));
            prev = h;
        }
        let (mu, logvar) = if pytorch_names {
            ("fc21", "fc22")
        } else {
            ("encoder.mu", "encoder.logvar")
        };
        specs.push((LayerRole::Mu, mu.into(), prev, config.latent));
        specs.push((LayerRole::LogVar, logvar.into(), prev, config.latent));
        // Decoder mirrors the encoder: latent -> hidden[n-1] -> ... -> hidden[0] -> input.
        let mut prev = config.latent;
        for (i, &h) in config.hidden.iter().rev().enumerate() {
            let name = if pytorch_names {
                "fc3".to_string()
            } else {
                format!("decoder.{i}")
            };
            specs.push((LayerRole::DecoderHidden(i), name, prev, h));
            prev = h;
        }
        let out = if pytorch_names { "fc4" } else { "decoder.out" };
        specs.push((LayerRole::DecoderOut, out.into(), prev, config.input_dim));

        let mut offset = 0;
        let layers = specs
            .into_iter()
            .map(|(role, name, in_dim, out_dim)| {
                let weight = offset..offset + in_dim * out_dim;
                let bias = weight.end..weight.end + out_dim;
                offset = bias.end;
                LinearLayout {
                    role,
                    name,
                    in_dim,
                    out_dim,
                    weight,
                    bias,
                }
            })
            .collect();
        ParamLayout {
            layers,
            len: offset,
        }
    }

    /// Total number of scalars.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Linear layers in storage order (encoder hidden, mu, logvar, decoder hidden, output).
    pub fn layers(&self) -> &[LinearLayout] {
        &self.layers
    }

    pub fn encoder_hidden(&self) -> impl Iterator<Item = &LinearLayout> {
        self.layers
            .iter()
            .filter(|l| matches!(l.role, LayerRole::EncoderHidden(_)))
    }

    pub fn decoder_hidden(&self) -> impl Iterator<Item = &LinearLayout> {
        self.layers
            .iter()
            .filter(|l| matches!(l.role, LayerRole::DecoderHidden(_)))
    }

    pub fn layer(&self, role: LayerRole) -> &LinearLayout {
        self.layers
            .iter()
            .find(|l| l.role == role)
            .expect("every layout has mu, logvar and decoder output layers")
    }

    /// Every tensor as `{layer}.weight` / `{layer}.bias`, in storage order.
    pub fn tensors(&self) -> Vec<TensorLayout> {
        self.layers
            .iter()
            .flat_map(|l| {
                [
                    TensorLayout {
                        name: format!("{}.weight", l.name),
                        shape: vec![l.out_dim, l.in_dim],
                        range: l.weight.clone(),
                    },
                    TensorLayout {
                        name: format!("{}.bias", l.name),
                        shape: vec![l.out_dim],
                        range: l.bias.clone(),
                    },
                ]
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_model_uses_pytorch_names_and_sizes() {
        let layout = ParamLayout::new(&ModelConfig::default());
        let names: Vec<_> = layout.tensors().into_iter().map(|t| t.name).collect();
        assert_eq!(
            names,
            [
                "fc1.weight",
                "fc1.bias",
                "fc21.weight",
                "fc21.bias",
                "fc22.weight",
                "fc22.bias",
                "fc3.weight",
                "fc3.bias",
                "fc4.weight",
                "fc4.bias"
            ]
        );
        // 784*400+400 + 2*(400*20+20) + 20*400+400 + 400*784+784
        assert_eq!(layout.len(), 652_824);
    }

    #[test]
    fn deeper_models_mirror_the_encoder() {
        let config = ModelConfig {
            hidden: vec![512, 256],
            ..ModelConfig::default()
        };
        let layout = ParamLayout::new(&config);
        let dims: Vec<_> = layout
            .layers()
            .iter()
            .map(|l| (l.name.as_str(), l.in_dim, l.out_dim))
            .collect();
        assert_eq!(
            dims,
            [
                ("encoder.0", 784, 512),
                ("encoder.1", 512, 256),
                ("encoder.mu", 256, 20),
                ("encoder.logvar", 256, 20),
                ("decoder.0", 20, 256),
                ("decoder.1", 256, 512),
                ("decoder.out", 512, 784),
            ]
        );
        let last = layout.layers().last().unwrap();
        assert_eq!(last.bias.end, layout.len());
    }
}

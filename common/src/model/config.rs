//! The model's configuration: sizes and the observation model.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The observation model p(x | z).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Likelihood {
    /// Decoder outputs are logits; log p(x|z) is computed stably from them. Needs x in [0, 1].
    Bernoulli,
    /// N(x | f(z), c I) with a fixed variance c.
    Gaussian { variance: f64 },
}

impl Likelihood {
    /// Parses `bernoulli` or `gaussian` (with the variance given separately).
    pub fn parse(name: &str, gaussian_variance: f64) -> Result<Self> {
        match name {
            "bernoulli" => Ok(Likelihood::Bernoulli),
            "gaussian" => Ok(Likelihood::Gaussian {
                variance: gaussian_variance,
            }),
            other => Err(Error::Config(format!(
                "unknown likelihood `{other}`: use `bernoulli` or `gaussian`"
            ))),
        }
    }

    /// The name used on the command line and in metadata.
    pub fn name(&self) -> &'static str {
        match self {
            Likelihood::Bernoulli => "bernoulli",
            Likelihood::Gaussian { .. } => "gaussian",
        }
    }
}

/// Sizes of the encoder/decoder MLPs and the observation model.
///
/// Encoder: `input_dim -> hidden[0] -> ... -> hidden[n-1] -> (mu, logvar)` in R^latent.
/// Decoder mirrors it: `latent -> hidden[n-1] -> ... -> hidden[0] -> input_dim`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub input_dim: usize,
    pub hidden: Vec<usize>,
    pub latent: usize,
    pub likelihood: Likelihood,
}

impl Default for ModelConfig {
    /// The PyTorch VAE example's model: 784-400-20, Bernoulli.
    fn default() -> Self {
        ModelConfig {
            input_dim: 784,
            hidden: vec![400],
            latent: 20,
            likelihood: Likelihood::Bernoulli,
        }
    }
}

impl ModelConfig {
    /// Checks sizes and the likelihood's parameters.
    pub fn validate(&self) -> Result<()> {
        if self.input_dim == 0 {
            return Err(Error::Config("input dimension must be positive".into()));
        }
        if self.latent == 0 {
            return Err(Error::Config("--latent must be positive".into()));
        }
        if let Some(pos) = self.hidden.iter().position(|&h| h == 0) {
            return Err(Error::Config(format!(
                "--hidden layer {pos} has size 0: every hidden layer needs at least one unit"
            )));
        }
        if let Likelihood::Gaussian { variance } = self.likelihood
            && !(variance.is_finite() && variance > 0.0)
        {
            return Err(Error::Config(format!(
                "gaussian variance must be a positive finite number, got {variance}"
            )));
        }
        Ok(())
    }
}

/// Parses a hidden-layer list such as `400` or `512,256`.
pub fn parse_hidden(spec: &str) -> Result<Vec<usize>> {
    spec.split(',')
        .map(|part| {
            part.trim().parse::<usize>().map_err(|_| {
                Error::Config(format!(
                    "--hidden `{spec}`: `{part}` is not a layer size; use e.g. `400` or `512,256`"
                ))
            })
        })
        .collect()
}

/// `784-400-20` style name for messages.
pub fn model_name(config: &ModelConfig) -> String {
    let mut parts = vec![config.input_dim.to_string()];
    parts.extend(config.hidden.iter().map(|h| h.to_string()));
    parts.push(config.latent.to_string());
    parts.join("-")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hidden_lists() {
        assert_eq!(parse_hidden("400").unwrap(), vec![400]);
        assert_eq!(parse_hidden("512, 256").unwrap(), vec![512, 256]);
        assert!(parse_hidden("512,x").is_err());
    }

    #[test]
    fn rejects_bad_sizes() {
        let mut c = ModelConfig {
            hidden: vec![400, 0],
            ..ModelConfig::default()
        };
        assert!(c.validate().is_err());
        c.hidden = vec![];
        c.validate().unwrap();
        c.likelihood = Likelihood::Gaussian { variance: -1.0 };
        assert!(c.validate().is_err());
    }
}

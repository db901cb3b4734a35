//! All conversion between protocol messages and domain types, so the maths never sees prost.

use bytes::Bytes;
use common::config::{Likelihood, ModelConfig};
use common::gradient::GradientSum;
use common::reduce::Node;

use crate::error::{Error, Result};
use crate::state;

/// f32 values as little-endian bytes, the wire format of every tensor.
pub fn f32_to_bytes(values: &[f32]) -> Bytes {
    proto::tensor::encode_f32(values)
}

/// Little-endian bytes back to f32 values; `what` names the tensor in the error.
pub fn bytes_to_f32(bytes: &[u8], what: &str) -> Result<Vec<f32>> {
    proto::tensor::decode_f32(bytes).ok_or_else(|| {
        Error::BadRequest(format!(
            "{what}: {} bytes is not a whole number of f32 values",
            bytes.len()
        ))
    })
}

pub fn model_to_proto(model: &ModelConfig) -> proto::ModelConfig {
    let (likelihood, gaussian_variance) = match model.likelihood {
        Likelihood::Bernoulli => ("bernoulli", 0.0),
        Likelihood::Gaussian { variance } => ("gaussian", variance),
    };
    proto::ModelConfig {
        input_dim: model.input_dim as u32,
        hidden: model.hidden.iter().map(|&h| h as u32).collect(),
        latent: model.latent as u32,
        likelihood: likelihood.into(),
        gaussian_variance,
    }
}

pub fn task_to_proto(task: &state::Task, params: Bytes) -> proto::Task {
    proto::Task {
        step: task.global_step,
        epoch: task.epoch,
        params,
        nodes: task
            .nodes
            .iter()
            .map(|n| proto::NodeWork {
                lo: n.node.lo,
                hi: n.node.hi,
                shards: n
                    .shards
                    .iter()
                    .map(|s| proto::ShardWork {
                        shard: s.shard,
                        examples: s.examples.clone(),
                    })
                    .collect(),
            })
            .collect(),
    }
}

/// A node result off the wire. Length and finiteness are checked by the state machine, which
/// knows the model; here only the encoding.
pub fn node_result_from_proto(r: proto::NodeResult) -> Result<(Node, GradientSum)> {
    if r.lo >= r.hi {
        return Err(Error::BadRequest(format!(
            "result for empty shard range {}..{}",
            r.lo, r.hi
        )));
    }
    let grad = bytes_to_f32(&r.grad, &format!("gradient for shards {}..{}", r.lo, r.hi))?;
    Ok((
        Node { lo: r.lo, hi: r.hi },
        GradientSum {
            grad,
            examples: r.examples,
            elbo: r.elbo,
            recon: r.recon,
            kl: r.kl,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensors_round_trip_bit_for_bit() {
        let values = [0.0f32, -0.0, 1.5, f32::MIN_POSITIVE, -3.25e-7, f32::MAX];
        let back = bytes_to_f32(&f32_to_bytes(&values), "t").unwrap();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&back), bits(&values));
        assert!(bytes_to_f32(&[0, 0, 0], "t").is_err());
    }
}

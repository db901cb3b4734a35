//! Turning a task into node gradients, on the worker's own rayon pool (never on the async
//! runtime's threads).

use std::sync::Arc;

use common::config::{Likelihood, ModelConfig};
use common::reduce::{Node, ReductionTree};
use common::train::{Engine, ShardBatch};
use ndarray::Array2;

use crate::error::{Error, Result};
use crate::shard_cache::ShardCache;

/// What a worker needs to know about the run it serves.
#[derive(Debug)]
pub struct RunContext {
    pub run_id: String,
    pub shards: usize,
    pub engine: Engine,
}

impl RunContext {
    pub fn from_proto(run: &proto::RunConfig) -> Result<Self> {
        let model = run
            .model
            .as_ref()
            .ok_or_else(|| Error::Protocol("run configuration without a model".into()))?;
        let likelihood = match model.likelihood.as_str() {
            "bernoulli" => Likelihood::Bernoulli,
            "gaussian" => Likelihood::Gaussian {
                variance: model.gaussian_variance,
            },
            other => {
                return Err(Error::Protocol(format!(
                    "the coordinator asks for likelihood `{other}`, which this worker does not \
                     know: run the same release on both sides"
                )));
            }
        };
        let config = ModelConfig {
            input_dim: model.input_dim as usize,
            hidden: model.hidden.iter().map(|&h| h as usize).collect(),
            latent: model.latent as usize,
            likelihood,
        };
        if run.shards == 0 {
            return Err(Error::Protocol("run configuration with 0 shards".into()));
        }
        Ok(RunContext {
            run_id: run.run_id.clone(),
            shards: run.shards as usize,
            engine: Engine::new(config, run.samples as usize, run.seed)?,
        })
    }
}

/// Deliberate misbehaviour, so tests can check the coordinator's defences (`--inject-fault`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// At this global step, send a gradient containing NaN.
    NanAtStep(u64),
    /// At this global step, send a gradient one value short.
    ShortAtStep(u64),
}

impl std::str::FromStr for Fault {
    type Err = String;

    /// `nan@STEP` or `short@STEP`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (kind, step) = s
            .split_once('@')
            .ok_or_else(|| format!("fault `{s}`: use nan@STEP or short@STEP"))?;
        let step: u64 = step
            .parse()
            .map_err(|_| format!("fault `{s}`: `{step}` is not a step number"))?;
        match kind {
            "nan" => Ok(Fault::NanAtStep(step)),
            "short" => Ok(Fault::ShortAtStep(step)),
            _ => Err(format!("fault `{s}`: use nan@STEP or short@STEP")),
        }
    }
}

/// Computes every node of `task`; the results go back in the task's order.
pub async fn run_task(
    ctx: &Arc<RunContext>,
    tree: &ReductionTree,
    pool: &Arc<rayon::ThreadPool>,
    cache: &ShardCache,
    task: proto::Task,
    fault: &mut Option<Fault>,
) -> Result<Vec<proto::NodeResult>> {
    let layout_len = ctx.engine.layout().len();
    let params = decode_params(&task.params, layout_len)?;
    let dim = ctx.engine.config().input_dim;
    // Gathering copies ~400 KB per step: cheap enough for the async thread.
    let mut nodes = Vec::with_capacity(task.nodes.len());
    for node in &task.nodes {
        let expected = (node.lo..node.hi).collect::<Vec<u32>>();
        let got: Vec<u32> = node.shards.iter().map(|s| s.shard).collect();
        if node.lo >= node.hi || expected != got || node.hi as usize > ctx.shards {
            return Err(Error::Protocol(format!(
                "task node {}..{} lists shards {got:?}",
                node.lo, node.hi
            )));
        }
        let shards = node
            .shards
            .iter()
            .map(|s| {
                Ok((
                    s.shard,
                    cache.gather(s.shard, &s.examples, dim)?,
                    s.examples.clone(),
                ))
            })
            .collect::<Result<Vec<(u32, Array2<f32>, Vec<u32>)>>>()?;
        nodes.push((
            Node {
                lo: node.lo,
                hi: node.hi,
            },
            shards,
        ));
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    let ctx = Arc::clone(ctx);
    let tree = *tree;
    let epoch = task.epoch;
    pool.spawn(move || {
        let results = nodes
            .iter()
            .map(|(node, shards)| {
                let batches: Vec<ShardBatch<'_>> = shards
                    .iter()
                    .map(|(shard, x, examples)| ShardBatch {
                        shard: *shard,
                        x: x.view(),
                        examples,
                    })
                    .collect();
                ctx.engine
                    .node_gradient(&params, epoch, &tree, *node, &batches)
                    .map(|sum| (*node, sum))
            })
            .collect::<Result<Vec<_>, common::Error>>();
        let _ = tx.send(results);
    });
    let results = rx
        .await
        .map_err(|_| Error::Other("gradient computation panicked".into()))??;
    Ok(results
        .into_iter()
        .map(|(node, mut sum)| {
            match fault.take_if(
                |f| matches!(f, Fault::NanAtStep(s) | Fault::ShortAtStep(s) if *s == task.step),
            ) {
                Some(Fault::NanAtStep(_)) => sum.grad[0] = f32::NAN,
                Some(Fault::ShortAtStep(_)) => {
                    sum.grad.pop();
                }
                None => {}
            }
            proto::NodeResult {
                lo: node.lo,
                hi: node.hi,
                grad: proto::tensor::encode_f32(&sum.grad),
                examples: sum.examples,
                elbo: sum.elbo,
                recon: sum.recon,
                kl: sum.kl,
            }
        })
        .collect())
}

fn decode_params(bytes: &[u8], expected: usize) -> Result<Vec<f32>> {
    match proto::tensor::decode_f32(bytes) {
        Some(params) if params.len() == expected => Ok(params),
        _ => Err(Error::Protocol(format!(
            "the coordinator sent {} bytes of parameters, this model has {expected} parameters \
             ({} bytes)",
            bytes.len(),
            expected * 4
        ))),
    }
}

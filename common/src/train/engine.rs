//! The engine the coordinator and workers call: shard gradients summed along the reduction tree.
//!
//! A node's gradient is computed exactly as [`ReductionTree::evaluate`] defines it: each shard's
//! [`GradientSum`] independently (its own forward/backward over its own examples, with noise keyed
//! by `(seed, epoch, example, k)`), then `left += right` at every inner node. So the bits of a node
//! do not depend on which process computes it, on how its sub-nodes were split between processes,
//! or on the rayon pool's size (docs/design.md §2; `tests/determinism.rs`).
//!
//! Callers run the engine inside their own rayon pool (`pool.install(|| engine.node_gradient(..))`):
//! shards of a node run in parallel, and large products inside a shard split at fixed boundaries.
//!
//! ```
//! use common::model::ModelConfig;
//! use common::train::{Engine, ReductionTree, ShardBatch};
//! use ndarray::Array2;
//!
//! let config = ModelConfig { input_dim: 4, hidden: vec![3], latent: 2, ..ModelConfig::default() };
//! let engine = Engine::new(config, 1, 42).unwrap();
//! let params = engine.init_params();
//! let x = Array2::<f32>::from_elem((2, 4), 0.5);
//! let tree = ReductionTree::new(1);
//! let shards = [ShardBatch { shard: 0, x: x.view(), examples: &[7, 8] }];
//! let sum = engine.node_gradient(&params, 0, &tree, tree.root(), &shards).unwrap();
//! assert_eq!(sum.stats.examples, 2);
//! assert_eq!(sum.grad.len(), engine.layout().len());
//! ```

use std::sync::Mutex;

use ndarray::ArrayView2;

use crate::model::ParamLayout;
use crate::model::fill_eps;
use crate::model::{BatchStats, ModelConfig};
use crate::model::{EvalReport, evaluate};
use crate::model::{Vae, Workspace, model_name};
use crate::train::GradientSum;
use crate::train::{Node, ReductionTree};
use crate::{Error, Result};

/// One shard's examples for one step. `x` row `i` is example `examples[i]` (a global id: it keys
/// the noise). May be empty (a shard that ran out of examples at the end of an epoch).
#[derive(Debug, Clone, Copy)]
pub struct ShardBatch<'a> {
    pub shard: u32,
    pub x: ArrayView2<'a, f32>,
    pub examples: &'a [u32],
}

/// The numerical engine: a model shape, the number of reparameterisation samples K, the run seed,
/// and pools of reusable buffers (so steady-state steps do not allocate activations).
pub struct Engine {
    vae: Vae,
    samples: usize,
    seed: u64,
    scratch: Mutex<Vec<Scratch>>,
}

impl std::fmt::Debug for Engine {
    /// The settings, not the buffer pools.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("model", &model_name(self.config()))
            .field("likelihood", &self.config().likelihood)
            .field("samples", &self.samples)
            .field("seed", &self.seed)
            .finish_non_exhaustive()
    }
}

/// Reusable buffers of one node computation: the model's workspace, the node's rows and ids.
#[derive(Debug, Default)]
struct Scratch {
    ws: Workspace<f32>,
    x: Vec<f32>,
    ids: Vec<u32>,
}

impl Engine {
    /// Validates the configuration; `samples` is K, at least 1.
    pub fn new(config: ModelConfig, samples: usize, seed: u64) -> Result<Self> {
        if samples == 0 {
            return Err(Error::Config(
                "--samples must be at least 1 (reparameterisation samples per example)".into(),
            ));
        }
        Ok(Engine {
            vae: Vae::new(config)?,
            samples,
            seed,
            scratch: Mutex::new(Vec::new()),
        })
    }

    pub fn layout(&self) -> &ParamLayout {
        self.vae.layout()
    }

    pub fn config(&self) -> &ModelConfig {
        self.vae.config()
    }

    pub fn vae(&self) -> &Vae {
        &self.vae
    }

    /// Reparameterisation samples per example (K).
    pub fn samples(&self) -> usize {
        self.samples
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// PyTorch-style initial parameters from the run seed
    /// ([`init_params`](crate::model::init_params)).
    pub fn init_params(&self) -> Vec<f32> {
        crate::model::init_params(self.layout(), self.seed)
    }

    /// The gradient sum of tree node `node` from its shards' batches (`shards[i]` is shard
    /// `node.lo + i`; a batch may be empty).
    pub fn node_gradient(
        &self,
        params: &[f32],
        epoch: u64,
        tree: &ReductionTree,
        node: Node,
        shards: &[ShardBatch],
    ) -> Result<GradientSum> {
        let mut out = GradientSum::zeros(0);
        self.node_gradient_into(params, epoch, tree, node, shards, &mut out)?;
        Ok(out)
    }

    /// [`Engine::node_gradient`] into a caller's buffer (reused across steps: no 2.6 MB
    /// allocation per step for the default model). `out` is overwritten.
    pub fn node_gradient_into(
        &self,
        params: &[f32],
        epoch: u64,
        tree: &ReductionTree,
        node: Node,
        shards: &[ShardBatch],
        out: &mut GradientSum,
    ) -> Result<()> {
        out.grad.resize(self.layout().len(), 0.0);
        out.stats = self.node_gradient_to(params, epoch, tree, node, shards, &mut out.grad)?;
        Ok(())
    }

    /// [`Engine::node_gradient`] written into `grad` (one value per parameter; overwritten), for
    /// callers that own the memory the gradient goes to (a worker's shared-memory file): the
    /// node's statistics are returned.
    pub fn node_gradient_to(
        &self,
        params: &[f32],
        epoch: u64,
        tree: &ReductionTree,
        node: Node,
        shards: &[ShardBatch],
        grad: &mut [f32],
    ) -> Result<BatchStats> {
        self.check_node(params, tree, node, shards)?;
        self.compute_node(params, epoch, node, shards, grad)
    }

    fn check_node(
        &self,
        params: &[f32],
        tree: &ReductionTree,
        node: Node,
        shards: &[ShardBatch],
    ) -> Result<()> {
        if !tree.contains(node) {
            return Err(Error::Config(format!(
                "shards {}..{} are not a node of the reduction tree over {} shards",
                node.lo,
                node.hi,
                tree.root().hi
            )));
        }
        if shards.len() != node.len() as usize {
            return Err(Error::DataMismatch(format!(
                "node {}..{} needs {} shard batches, got {}",
                node.lo,
                node.hi,
                node.len(),
                shards.len()
            )));
        }
        self.vae.check_params(params)?;
        for (i, batch) in shards.iter().enumerate() {
            let want = node.lo + i as u32;
            if batch.shard != want {
                return Err(Error::DataMismatch(format!(
                    "batch {i} of node {}..{} is for shard {}, expected shard {want}",
                    node.lo, node.hi, batch.shard
                )));
            }
            if batch.x.nrows() != batch.examples.len() {
                return Err(Error::DataMismatch(format!(
                    "shard {}: {} rows of data but {} example ids",
                    batch.shard,
                    batch.x.nrows(),
                    batch.examples.len()
                )));
            }
            if batch.x.ncols() != self.config().input_dim {
                return Err(Error::DataMismatch(format!(
                    "shard {}: examples have {} values, the model's input dimension is {}",
                    batch.shard,
                    batch.x.ncols(),
                    self.config().input_dim
                )));
            }
        }
        Ok(())
    }

    /// `node`'s sum: the node's shards stacked into one batch and handed to
    /// [`Vae::elbo_grad_tree`], which gives exactly the bits of computing every shard alone and
    /// adding the results along the tree below `node` as [`ReductionTree::evaluate`] does.
    fn compute_node(
        &self,
        params: &[f32],
        epoch: u64,
        node: Node,
        shards: &[ShardBatch],
        grad: &mut [f32],
    ) -> Result<BatchStats> {
        let (d, z_dim, k) = (self.config().input_dim, self.config().latent, self.samples);
        let mut scratch = self.scratch.lock().expect("pool").pop().unwrap_or_default();
        let Scratch { ws, x, ids } = &mut scratch;
        let sizes: Vec<usize> = shards.iter().map(|b| b.examples.len()).collect();
        let n: usize = sizes.iter().sum();
        ids.clear();
        shards
            .iter()
            .for_each(|b| ids.extend_from_slice(b.examples));
        let x_view = if let [only] = shards {
            only.x
        } else {
            // The rows of all shards, in shard order: [n, D].
            x.clear();
            for b in shards {
                match b.x.as_slice() {
                    Some(rows) => x.extend_from_slice(rows),
                    None => x.extend(b.x.iter().copied()),
                }
            }
            ArrayView2::from_shape((n, d), &x[..]).expect("n rows of D values")
        };
        let mut eps = std::mem::take(&mut ws.eps);
        eps.resize(n * k * z_dim, 0.0);
        fill_eps(self.seed, epoch, ids, 0, k, z_dim, &mut eps);
        let eps_view =
            ArrayView2::from_shape((n * k, z_dim), &eps[..]).expect("noise is [n * K, Z]");
        let result = self
            .vae
            .elbo_grad_tree(params, x_view, eps_view, node, &sizes, grad, ws);
        ws.eps = eps;
        self.scratch.lock().expect("pool").push(scratch);
        result
    }

    /// Held-out evaluation ([`evaluate`](crate::model::evaluate)): mean ELBO (K = 1, fixed
    /// evaluation noise), recon, KL and, unless `iw_samples` is 0, the importance-weighted bound
    /// with that many samples.
    pub fn evaluate(
        &self,
        params: &[f32],
        x: ArrayView2<f32>,
        iw_samples: usize,
    ) -> Result<EvalReport> {
        self.vae.check_params(params)?;
        evaluate(&self.vae, params, x, self.seed, iw_samples)
    }
}

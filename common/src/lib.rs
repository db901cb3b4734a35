//! The numerical core shared by the coordinator and the workers, in six folders:
//!
//! - [`model`]: the VAE itself. Its configuration and parameter layout (PyTorch names for the
//!   default model), PyTorch-style initialisation, keyed random numbers and reparameterisation
//!   noise, the ELBO with hand-written gradients, the per-batch statistics, held-out evaluation
//!   and the forward passes behind the pictures.
//! - [`kernels`]: the deterministic arithmetic under the model: GEMMs and column sums split at
//!   shape-fixed boundaries, and the elementwise kernels beside them.
//! - [`train`]: virtual shards, the fixed reduction tree and its fold, gradient sums, and the
//!   [`train::Engine`] that computes a tree node's gradient (bit-identical however work is split).
//! - [`optim`]: Adam and SGD as pure step functions with explicit state, and gradient clipping.
//! - [`data`]: the built-in synthetic dataset, IDX, `.npy`, MNIST download, held-out split.
//! - [`formats`]: files on disk: the model and checkpoint files, their fingerprint, atomic writes.
//!
//! Beside them, [`memory`]: buffers made resident before the steps that use them.
//!
//! The design these follow (the model and its objective, the invariant and the fixed reduction
//! order, the process roles, measured facts) is written down in `docs/design.md`.
//!
//! ```
//! use common::model::{ModelConfig, ParamLayout};
//! let layout = ParamLayout::new(&ModelConfig::default());
//! assert_eq!(layout.tensors()[0].name, "fc1.weight");
//! ```

pub mod data;
mod error;
pub mod formats;
pub mod kernels;
pub mod memory;
pub mod model;
pub mod optim;
pub mod train;

pub use error::{Error, Result};

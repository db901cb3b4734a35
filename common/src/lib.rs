//! The numerical core shared by the coordinator and the workers.
//!
//! - [`config`], [`layout`]: the model's sizes and where each tensor lives in the flat parameter
//!   vector (PyTorch names for the default model).
//! - [`init`], [`noise`], [`elbo`], [`eval`]: PyTorch-style initialisation, keyed reparameterisation
//!   noise, the ELBO with hand-written gradients, held-out ELBO and importance-weighted bound.
//! - [`shard`], [`reduce`], [`train`]: virtual shards, the fixed reduction tree, and the gradient
//!   of a set of shards combined in that order (bit-identical however work is split).
//! - [`optim`]: Adam and SGD as pure step functions with explicit state.
//! - [`data`]: the built-in synthetic dataset, IDX, `.npy`, MNIST download, held-out split.
//!
//! ```
//! use common::{config::ModelConfig, layout::ParamLayout};
//! let layout = ParamLayout::new(&ModelConfig::default());
//! assert_eq!(layout.tensors()[0].name, "fc1.weight");
//! ```

pub mod atomic_file;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod elbo;
pub mod error;
pub mod eval;
pub mod fingerprint;
pub mod gradient;
pub mod inference;
pub mod init;
pub mod keyed;
pub mod layout;
pub mod linalg;
pub mod model_file;
pub mod noise;
pub mod optim;
pub mod reduce;
pub mod scalar;
pub mod shard;
mod tensor_file;
pub mod train;

pub use error::{Error, Result};

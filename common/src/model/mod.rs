//! The model: a VAE's configuration and where each tensor lives in the flat parameter vector
//! ([`ModelConfig`], [`ParamLayout`]), its PyTorch-style initialisation, the counter-based random
//! numbers and the reparameterisation noise keyed by example, the ELBO of a batch with its
//! hand-written gradient ([`Vae`], also for the shards of a reduction-tree node stacked in one
//! batch), the per-batch statistics ([`BatchStats`]), held-out evaluation with the
//! importance-weighted bound, and the forward passes behind the pictures (`encode`, `decode`,
//! `mean_image`, `prior_latents`). Everything here is a pure function of parameters, data and
//! keys; the arithmetic runs on [`crate::kernels`] (docs/design.md §1).

mod config;
mod elbo;
mod eval;
mod inference;
mod init;
mod keyed;
mod layout;
mod noise;
mod stacked;
mod stats;

pub use config::{Likelihood, ModelConfig, model_name, parse_hidden};
pub use elbo::{Vae, Workspace};
pub use eval::{EVAL_EPOCH, EvalReport, evaluate};
pub use inference::{PRIOR_DOMAIN, Posterior, decode, encode, mean_image, prior_latents};
pub use init::init_params;
pub use keyed::{KeyedRng, domain, hash_key, mix64};
pub use layout::{LayerRole, LinearLayout, ParamLayout, TensorLayout};
pub use noise::{fill_eps, sample_eps};
pub use stats::BatchStats;

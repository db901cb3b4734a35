//! A worker of a data-parallel VAE training run: it dials the coordinator, receives its shards'
//! data, computes their ELBO gradients on its own rayon pool and sends the sums back.
//! `worker bench` times full training steps on this machine.

pub mod bench;
pub mod bench_products;
pub mod client;
pub mod compute;
pub mod cpu_time;
pub mod error;
pub mod mailbox_client;
pub mod shard_cache;

pub use error::{Error, Result};

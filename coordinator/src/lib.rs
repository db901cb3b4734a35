//! The coordinator of a data-parallel VAE training run.
//!
//! It owns the dataset, the shard assignment, the parameters, the optimizer, checkpoints and
//! metrics. [`state::StateMachine`] is pure (events in, decisions out); [`service`] adapts it to
//! gRPC; [`run`] loads data, serves, spawns local workers and writes the outputs.

pub mod assignment;
pub mod checkpoint_writer;
pub mod cli;
pub mod config;
pub mod config_file;
pub mod error;
pub mod gate;
pub mod listener;
pub mod local;
pub mod mailbox_server;
pub mod metrics;
pub mod names;
pub mod outputs;
pub mod progress;
pub mod run;
pub mod service;
pub mod sessions;
pub mod state;
pub mod tools;
pub mod transport;
pub mod update;
pub mod verification;

pub use error::{Error, Result};

//! What a run writes into `--out`: `config.json`, `metrics.jsonl`, checkpoints,
//! `model.safetensors` and `summary.json`.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::TrainConfig;
use crate::error::{Error, Result};
use crate::state::EpochTotals;

pub const CONFIG_FILE: &str = "config.json";
pub const METRICS_FILE: &str = "metrics.jsonl";
pub const CHECKPOINT_FILE: &str = "checkpoint.safetensors";
pub const MODEL_FILE: &str = "model.safetensors";
pub const SUMMARY_FILE: &str = "summary.json";

/// The time split of a span of steps, in seconds.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct TimeSplit {
    /// Wall time of the steps (dispatch to update), evaluation excluded.
    pub step_s: f64,
    /// The slowest worker's gradient computation per step, summed.
    pub compute_s: f64,
    /// Tree reduction and optimizer step on the coordinator.
    pub update_s: f64,
    /// Everything else: transfers, encoding, waiting for the slowest message.
    pub communicate_s: f64,
}

impl TimeSplit {
    pub fn of(t: &EpochTotals) -> Self {
        TimeSplit {
            step_s: t.step_seconds,
            compute_s: t.compute_seconds,
            update_s: t.update_seconds,
            communicate_s: (t.step_seconds - t.compute_seconds - t.update_seconds).max(0.0),
        }
    }

    pub fn add(&mut self, other: &TimeSplit) {
        self.step_s += other.step_s;
        self.compute_s += other.compute_s;
        self.update_s += other.update_s;
        self.communicate_s += other.communicate_s;
    }
}

/// Held-out figures of one evaluation, in nats per example.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Heldout {
    pub elbo: f64,
    pub recon: f64,
    pub kl: f64,
    pub iw_bound: Option<f64>,
}

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochMetrics {
    /// 1-based: the number of epochs completed.
    pub epoch: u64,
    pub global_step: u64,
    pub examples: u64,
    pub train_elbo: f64,
    /// Training reconstruction term E_q[log p(x|z)] and KL, per example.
    pub recon: f64,
    pub kl: f64,
    pub heldout_elbo: f64,
    pub heldout_recon: f64,
    pub heldout_kl: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heldout_iw_bound: Option<f64>,
    pub samples_per_s: f64,
    #[serde(flatten)]
    pub time: TimeSplit,
    pub workers: usize,
}

impl EpochMetrics {
    pub fn new(epoch: u64, global_step: u64, t: &EpochTotals, h: &Heldout, workers: usize) -> Self {
        let per = |x: f64| x / t.stats.examples.max(1) as f64;
        EpochMetrics {
            epoch: epoch + 1,
            global_step,
            examples: t.stats.examples,
            train_elbo: per(t.stats.elbo),
            recon: per(t.stats.recon),
            kl: per(t.stats.kl),
            heldout_elbo: h.elbo,
            heldout_recon: h.recon,
            heldout_kl: h.kl,
            heldout_iw_bound: h.iw_bound,
            samples_per_s: t.stats.examples as f64 / t.step_seconds.max(1e-9),
            time: TimeSplit::of(t),
            workers,
        }
    }
}

/// `summary.json`: the run's final figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub epochs: u64,
    pub global_steps: u64,
    pub train_elbo: f64,
    pub heldout_elbo: f64,
    pub heldout_recon: f64,
    pub heldout_kl: f64,
    pub heldout_iw_bound: Option<f64>,
    pub iw_samples: usize,
    /// Training examples per second over the run: start-up and evaluation excluded.
    pub samples_per_s: f64,
    #[serde(flatten)]
    pub time: TimeSplit,
    /// SHA-256 of the final parameters (see `common::formats::fingerprint`).
    pub fingerprint: String,
    pub wall_s: f64,
}

/// Appends metrics lines; on resume the file is rewritten from the checkpoint's history first,
/// so lines written after the checkpoint are not duplicated.
#[derive(Debug)]
pub struct MetricsLog {
    file: File,
    path: PathBuf,
}

impl MetricsLog {
    pub fn create(dir: &Path, history: &[String]) -> Result<Self> {
        let path = dir.join(METRICS_FILE);
        let mut file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&path)
            .map_err(|e| io_error(&path, e))?;
        for line in history {
            writeln!(file, "{line}").map_err(|e| io_error(&path, e))?;
        }
        Ok(MetricsLog { file, path })
    }

    /// Writes a line and returns it (for the checkpoint's history).
    pub fn append(&mut self, metrics: &EpochMetrics) -> Result<String> {
        let line = serde_json::to_string(metrics).expect("metrics serialise");
        writeln!(self.file, "{line}").map_err(|e| io_error(&self.path, e))?;
        self.file.flush().map_err(|e| io_error(&self.path, e))?;
        Ok(line)
    }
}

pub fn prepare_dir(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).map_err(|e| {
        Error::Io(format!(
            "cannot create output directory {}: {e}; choose another with --out",
            dir.display()
        ))
    })
}

/// The effective settings, as `config.json` (read by the tools) and `config.toml` (read by
/// `--config`).
pub fn write_config(dir: &Path, config: &TrainConfig) -> Result<()> {
    let json = serde_json::to_string_pretty(config).expect("config serialises");
    write_json(&dir.join(CONFIG_FILE), &json)?;
    let toml = crate::config_file::to_toml(config);
    let path = dir.join(crate::config_file::CONFIG_TOML);
    common::formats::write_atomic(&path, toml.as_bytes()).map_err(Error::from)
}

pub fn write_summary(dir: &Path, summary: &Summary) -> Result<()> {
    let json = serde_json::to_string_pretty(summary).expect("summary serialises");
    write_json(&dir.join(SUMMARY_FILE), &json)
}

fn write_json(path: &Path, json: &str) -> Result<()> {
    common::formats::write_atomic(path, format!("{json}\n").as_bytes()).map_err(Error::from)
}

fn io_error(path: &Path, e: std::io::Error) -> Error {
    Error::Io(format!("{}: {e}", path.display()))
}

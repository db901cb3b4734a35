//! What a run writes into `--out`: `config.json`, `metrics.jsonl`, checkpoints,
//! `model.safetensors` and `summary.json`; which directory a fresh run may take; and the two
//! checkpoints kept, the newest and the previous.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use common::formats::Checkpoint;

use crate::config::TrainConfig;
use crate::error::{Error, Result};
use crate::state::EpochTotals;

pub const CONFIG_FILE: &str = "config.json";
pub const METRICS_FILE: &str = "metrics.jsonl";
/// The newest checkpoint.
pub const CHECKPOINT_FILE: &str = "checkpoint.safetensors";
/// The checkpoint before the newest: `--resume` falls back to it when the newest is unreadable.
pub const PREV_CHECKPOINT_FILE: &str = "checkpoint.prev.safetensors";
/// An unreadable newest checkpoint, moved here by a `--resume` that fell back to the previous one
/// (kept for inspection; out of the rotation, so it never becomes "the previous").
pub const CORRUPT_CHECKPOINT_FILE: &str = "checkpoint.corrupt.safetensors";
pub const MODEL_FILE: &str = "model.safetensors";
pub const SUMMARY_FILE: &str = "summary.json";

/// The files that hold a run's results. A fresh run (no `--resume`) refuses a directory with any
/// of them (`metrics.jsonl` only when it has a line) unless `--force`.
const RESULT_FILES: &[&str] = &[
    CHECKPOINT_FILE,
    PREV_CHECKPOINT_FILE,
    CORRUPT_CHECKPOINT_FILE,
    MODEL_FILE,
    SUMMARY_FILE,
    METRICS_FILE,
];

/// Every file a run writes but its pictures (which every run redraws): what `--force` deletes.
pub const RUN_FILES: &[&str] = &[
    CHECKPOINT_FILE,
    PREV_CHECKPOINT_FILE,
    CORRUPT_CHECKPOINT_FILE,
    MODEL_FILE,
    SUMMARY_FILE,
    METRICS_FILE,
    CONFIG_FILE,
    crate::config_file::CONFIG_TOML,
];

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

/// Creates `dir` if needed. A fresh run (`resume` false) must not silently replace another run:
/// if `dir` holds a run's results (a checkpoint, model, summary or metrics line) it is refused,
/// unless `force`, which first deletes every file of that run ([`RUN_FILES`]). Settings files
/// alone (a run stopped before it trained anything) are simply rewritten.
pub fn prepare_dir(dir: &Path, resume: bool, force: bool) -> Result<()> {
    fs::create_dir_all(dir).map_err(|e| {
        Error::Io(format!(
            "cannot create output directory {}: {e}; choose another with --out",
            dir.display()
        ))
    })?;
    if resume {
        return Ok(());
    }
    let results: Vec<&str> = RESULT_FILES
        .iter()
        .copied()
        .filter(|&name| {
            let path = dir.join(name);
            if name == METRICS_FILE {
                fs::metadata(&path).is_ok_and(|m| m.len() > 0)
            } else {
                path.exists()
            }
        })
        .collect();
    if results.is_empty() {
        return Ok(());
    }
    if !force {
        return Err(Error::Config(format!(
            "{} holds another run ({}): continue it with --resume, replace it with --force \
             (which deletes its files first), or choose another --out",
            dir.display(),
            results.join(", ")
        )));
    }
    let present: Vec<&str> = RUN_FILES
        .iter()
        .copied()
        .filter(|name| dir.join(name).exists())
        .collect();
    for name in &present {
        let path = dir.join(name);
        fs::remove_file(&path).map_err(|e| io_error(&path, e))?;
    }
    tracing::warn!(
        "--force: deleted the files of the run that was in {}: {}",
        dir.display(),
        present.join(", ")
    );
    Ok(())
}

/// Writes `checkpoint` as the newest in `dir` and keeps the one it replaces as the previous
/// ([`PREV_CHECKPOINT_FILE`]). The newest is renamed before the new one is written (atomically),
/// so at every moment one of the two names holds a complete checkpoint.
pub fn save_checkpoint(dir: &Path, checkpoint: &Checkpoint) -> Result<()> {
    let newest = dir.join(CHECKPOINT_FILE);
    if newest.exists() {
        let prev = dir.join(PREV_CHECKPOINT_FILE);
        fs::rename(&newest, &prev).map_err(|e| io_error(&prev, e))?;
    }
    checkpoint.save(&newest).map_err(Error::from)
}

/// A checkpoint read back for `--resume`.
#[derive(Debug)]
pub struct LoadedCheckpoint {
    pub checkpoint: Checkpoint,
    /// The file it came from.
    pub path: PathBuf,
    /// The newest checkpoint when it could not be read (and `path` is the previous one): once the
    /// resume is accepted, [`set_aside`] moves it out of the rotation.
    pub unreadable: Option<PathBuf>,
}

/// Moves an unreadable newest checkpoint to [`CORRUPT_CHECKPOINT_FILE`] beside it, so the next
/// checkpoint does not rotate it into the previous one's place.
pub fn set_aside(unreadable: &Path) -> Result<()> {
    let aside = unreadable.with_file_name(CORRUPT_CHECKPOINT_FILE);
    fs::rename(unreadable, &aside).map_err(|e| io_error(&aside, e))?;
    tracing::warn!(
        "moved the unreadable {} to {}",
        unreadable.display(),
        aside.display()
    );
    Ok(())
}

/// The checkpoint `--resume` continues from: the newest in `dir`, or the previous one when the
/// newest is missing or cannot be read (truncated, corrupt), with a warning naming it. `None`
/// when `dir` holds neither; an error when neither of those present can be read.
pub fn load_checkpoint(dir: &Path) -> Result<Option<LoadedCheckpoint>> {
    let newest = dir.join(CHECKPOINT_FILE);
    let prev = dir.join(PREV_CHECKPOINT_FILE);
    let newest_error = if newest.exists() {
        match Checkpoint::load(&newest) {
            Ok(checkpoint) => {
                return Ok(Some(LoadedCheckpoint {
                    checkpoint,
                    path: newest,
                    unreadable: None,
                }));
            }
            Err(e) => Some(e),
        }
    } else {
        None
    };
    if !prev.exists() {
        return match newest_error {
            None => Ok(None),
            Some(e) => Err(Error::Io(format!(
                "cannot resume: {e}; and there is no previous checkpoint {} to fall back to. \
                 Restore a checkpoint, or start afresh with --force instead of --resume",
                prev.display()
            ))),
        };
    }
    match Checkpoint::load(&prev) {
        Ok(checkpoint) => {
            match &newest_error {
                Some(e) => tracing::warn!(
                    "the newest checkpoint cannot be read ({e}): resuming from the previous one, \
                     {}",
                    prev.display()
                ),
                None => tracing::warn!(
                    "no {} (the run stopped while replacing it): resuming from the previous \
                     checkpoint, {}",
                    newest.display(),
                    prev.display()
                ),
            }
            Ok(Some(LoadedCheckpoint {
                checkpoint,
                path: prev,
                unreadable: newest_error.map(|_| newest),
            }))
        }
        Err(prev_error) => Err(Error::Io(format!(
            "cannot resume: no checkpoint in {} can be read ({}; {prev_error}). Restore one, or \
             start afresh with --force instead of --resume",
            dir.display(),
            newest_error.map_or_else(
                || format!("{} is missing", newest.display()),
                |e| e.to_string()
            ),
        ))),
    }
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use common::optim::OptimizerConfig;

    /// A small Adam checkpoint at `global_step` (its parameters all equal to the step).
    pub(crate) fn checkpoint(global_step: u64) -> Checkpoint {
        let optimizer = OptimizerConfig::adam(1e-3);
        Checkpoint {
            params: vec![global_step as f32; 8],
            optimizer_state: optimizer.init_state(8),
            optimizer,
            global_step,
            epoch: 0,
            step_in_epoch: global_step,
            run_config_json: "{}".into(),
            metrics_history: Vec::new(),
        }
    }

    fn step_of(dir: &Path) -> u64 {
        load_checkpoint(dir)
            .unwrap()
            .expect("a checkpoint")
            .checkpoint
            .global_step
    }

    #[test]
    fn the_last_two_checkpoints_are_kept_and_an_unreadable_newest_falls_back() {
        let dir = tempfile::tempdir().unwrap();
        let (newest, prev) = (
            dir.path().join(CHECKPOINT_FILE),
            dir.path().join(PREV_CHECKPOINT_FILE),
        );
        assert!(load_checkpoint(dir.path()).unwrap().is_none());
        for step in 1..=3 {
            save_checkpoint(dir.path(), &checkpoint(step)).unwrap();
        }
        assert_eq!(step_of(dir.path()), 3);
        assert_eq!(Checkpoint::load(&prev).unwrap().global_step, 2);

        // Truncated newest: the previous one, and the newest named as unreadable.
        let bytes = fs::read(&newest).unwrap();
        fs::write(&newest, &bytes[..bytes.len() / 2]).unwrap();
        let loaded = load_checkpoint(dir.path()).unwrap().unwrap();
        assert_eq!(
            (loaded.checkpoint.global_step, &loaded.path),
            (2, &prev),
            "fell back"
        );
        assert_eq!(loaded.unreadable.as_ref(), Some(&newest));
        // Set aside, it never becomes "the previous": the next save keeps step 2 there.
        set_aside(&newest).unwrap();
        assert!(dir.path().join(CORRUPT_CHECKPOINT_FILE).is_file());
        save_checkpoint(dir.path(), &checkpoint(4)).unwrap();
        assert_eq!(step_of(dir.path()), 4);
        assert_eq!(Checkpoint::load(&prev).unwrap().global_step, 2);

        // A crash between the rotation's rename and the write: only the previous is there.
        fs::remove_file(&newest).unwrap();
        assert_eq!(step_of(dir.path()), 2);

        // Neither readable: an error naming both.
        fs::write(&newest, b"garbage").unwrap();
        fs::write(&prev, b"garbage").unwrap();
        let e = load_checkpoint(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains(CHECKPOINT_FILE)
                && e.contains(PREV_CHECKPOINT_FILE)
                && e.contains("--force"),
            "{e}"
        );
        // An unreadable newest with no previous: an error, not a fresh start.
        fs::remove_file(&prev).unwrap();
        let e = load_checkpoint(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains(CHECKPOINT_FILE) && e.contains("no previous"),
            "{e}"
        );
    }

    #[test]
    fn a_fresh_run_takes_only_a_directory_without_another_runs_results() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        prepare_dir(&out, false, false).unwrap();
        // Other files, settings alone and an empty metrics file are no run to keep.
        fs::write(out.join("notes.txt"), "mine").unwrap();
        fs::write(out.join(CONFIG_FILE), "{}").unwrap();
        fs::write(out.join(crate::config_file::CONFIG_TOML), "").unwrap();
        fs::write(out.join(METRICS_FILE), "").unwrap();
        prepare_dir(&out, false, false).unwrap();
        for name in RESULT_FILES {
            fs::write(out.join(name), "x").unwrap();
            let e = prepare_dir(&out, false, false).unwrap_err().to_string();
            assert!(e.contains(name) && e.contains("--force"), "{e}");
            prepare_dir(&out, true, false).unwrap();
            assert!(out.join(name).exists(), "--resume deletes nothing");
        }
        prepare_dir(&out, false, true).unwrap();
        for name in RUN_FILES {
            assert!(!out.join(name).exists(), "--force deleted {name}");
        }
        assert!(out.join("notes.txt").exists(), "other files stay");
        prepare_dir(&out, false, false).unwrap();
    }
}

//! Training checkpoints: everything needed to continue a run bit for bit.
//!
//! One safetensors file, written atomically. Tensors: `params` (`[n]`, the flat
//! [`ParamLayout`](crate::model::ParamLayout) vector) and the optimizer's buffers as
//! `optimizer.{name}` (`[n]` each: `optimizer.exp_avg`, `optimizer.exp_avg_sq` for Adam,
//! `optimizer.momentum_buffer` for SGD with momentum once it exists). Metadata (strings):
//!
//! | key                   | value                                                           |
//! |-----------------------|-----------------------------------------------------------------|
//! | `vae.kind`            | `checkpoint`                                                    |
//! | `vae.format_version`  | `1`                                                             |
//! | `vae.checkpoint`      | JSON: optimizer config, optimizer step, global step, epoch,     |
//! |                       | step within the epoch, SHA-256 of each optimizer buffer         |
//! | `vae.fingerprint`     | [`fingerprint`] of `params`                                     |
//! | `vae.run_config`      | the caller's run configuration, verbatim                        |
//! | `vae.metrics_history` | JSON array of the caller's metrics lines, verbatim              |
//!
//! Every tensor's hash is checked on load, so a corrupt checkpoint is refused rather than
//! resumed from.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::atomic_file::write_atomic_with;
use super::fingerprint::{fingerprint, sha256_f32};
use super::model_file::{FINGERPRINT_KEY, FORMAT_VERSION, KIND_KEY, VERSION_KEY, check_kind};
use super::tensor_file::{F32Tensor, TensorFile, encode_to};
use crate::optim::{OptimizerConfig, OptimizerState};
use crate::{Error, Result};

const KIND_CHECKPOINT: &str = "checkpoint";
const STATE_KEY: &str = "vae.checkpoint";
const RUN_CONFIG_KEY: &str = "vae.run_config";
const METRICS_KEY: &str = "vae.metrics_history";
const PARAMS: &str = "params";
const BUFFER_PREFIX: &str = "optimizer.";

/// A training run's state between two steps.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    /// Flat parameters, in [`ParamLayout`](crate::model::ParamLayout) order.
    pub params: Vec<f32>,
    pub optimizer: OptimizerConfig,
    pub optimizer_state: OptimizerState,
    /// Optimizer steps taken in the whole run.
    pub global_step: u64,
    /// The epoch the next step belongs to (from 0).
    pub epoch: u64,
    /// Steps already taken in `epoch`.
    pub step_in_epoch: u64,
    /// The run's configuration as JSON, owned by the caller; stored and returned verbatim.
    pub run_config_json: String,
    /// Metrics lines written so far (JSON, owned by the caller), so a resumed run keeps them.
    pub metrics_history: Vec<String>,
}

/// The scalar state, as stored under `vae.checkpoint`.
#[derive(Debug, Serialize, Deserialize)]
struct StoredState {
    optimizer: OptimizerConfig,
    optimizer_step: u64,
    global_step: u64,
    epoch: u64,
    step_in_epoch: u64,
    /// Hex SHA-256 of each optimizer buffer, by buffer name (e.g. `exp_avg`).
    buffer_sha256: BTreeMap<String, String>,
}

impl Checkpoint {
    /// Writes the checkpoint to `path` atomically. Fails if the optimizer buffers do not match
    /// the parameters in length or belong to a different optimizer.
    pub fn save(&self, path: &Path) -> Result<()> {
        let n = self.params.len();
        self.optimizer_state
            .check(&self.optimizer, n)
            .map_err(|e| {
                Error::Tensor(format!("cannot save checkpoint {}: {e}", path.display()))
            })?;
        let buffers = self.optimizer_state.buffers();
        let state = StoredState {
            optimizer: self.optimizer.clone(),
            optimizer_step: self.optimizer_state.step,
            global_step: self.global_step,
            epoch: self.epoch,
            step_in_epoch: self.step_in_epoch,
            buffer_sha256: buffers
                .iter()
                .map(|(name, b)| (name.to_string(), hex::encode(sha256_f32(b))))
                .collect(),
        };
        let metadata = BTreeMap::from([
            (KIND_KEY.to_string(), KIND_CHECKPOINT.to_string()),
            (VERSION_KEY.to_string(), FORMAT_VERSION.to_string()),
            (
                STATE_KEY.to_string(),
                serde_json::to_string(&state).expect("checkpoint state serialises to JSON"),
            ),
            (FINGERPRINT_KEY.to_string(), fingerprint(&self.params)),
            (RUN_CONFIG_KEY.to_string(), self.run_config_json.clone()),
            (
                METRICS_KEY.to_string(),
                serde_json::to_string(&self.metrics_history).expect("strings serialise to JSON"),
            ),
        ]);

        let shape = [n];
        let names: Vec<String> = buffers
            .iter()
            .map(|(name, _)| format!("{BUFFER_PREFIX}{name}"))
            .collect();
        let mut tensors = vec![F32Tensor {
            name: PARAMS,
            shape: &shape,
            data: &self.params,
        }];
        tensors.extend(
            names
                .iter()
                .zip(&buffers)
                .map(|(name, (_, data))| F32Tensor {
                    name,
                    shape: &shape,
                    data,
                }),
        );
        write_atomic_with(path, |file| encode_to(file, &tensors, &metadata))
    }

    /// Reads a checkpoint written by [`save`](Self::save). Errors name the file and what is
    /// wrong: not safetensors or truncated, a model rather than a checkpoint, missing or invalid
    /// metadata, missing, unexpected or wrongly shaped tensors, or tensors whose hash does not
    /// match the one recorded (corruption).
    ///
    /// The file is untrusted: every buffer is allocated only after its shape was checked against
    /// the file's own tensors, so memory stays within about twice the file's size plus its
    /// header's strings.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::from_bytes(path, bytes)
    }

    /// [`load`](Self::load) on a file's contents already in memory; `path` names it in errors.
    pub fn from_bytes(path: &Path, bytes: Vec<u8>) -> Result<Self> {
        let file = TensorFile::from_bytes(path, bytes)?;
        check_kind(&file, KIND_CHECKPOINT)?;
        let hint = "the checkpoint is incomplete; it was not written by this program";
        let state_json = file.required_metadata(STATE_KEY, hint)?;
        let state: StoredState = serde_json::from_str(state_json)
            .map_err(|e| file.error(format!("`{STATE_KEY}` is not valid ({e}): {state_json}")))?;
        state
            .optimizer
            .validate()
            .map_err(|e| file.error(format!("`{STATE_KEY}`: {e}")))?;
        let run_config_json = file.required_metadata(RUN_CONFIG_KEY, hint)?.to_string();
        let metrics_json = file.required_metadata(METRICS_KEY, hint)?;
        let metrics_history: Vec<String> = serde_json::from_str(metrics_json).map_err(|e| {
            file.error(format!(
                "`{METRICS_KEY}` is not a JSON array of strings ({e})"
            ))
        })?;
        let recorded_fingerprint = file.required_metadata(FINGERPRINT_KEY, hint)?;

        let n = match file.shape(PARAMS) {
            Some([n]) => *n,
            Some(shape) => {
                return Err(file.error(format!(
                    "tensor `{PARAMS}` has shape {shape:?}, expected one dimension"
                )));
            }
            None => return Err(file.error(format!("missing tensor `{PARAMS}`"))),
        };
        file.check_f32(PARAMS, &[n])?;
        let mut params = vec![0.0; n];
        file.read_f32_into(PARAMS, &[n], &mut params)?;
        let actual = fingerprint(&params);
        if actual != recorded_fingerprint {
            return Err(file.error(format!(
                "tensor `{PARAMS}` has fingerprint {actual} but the file recorded \
                 {recorded_fingerprint}: the checkpoint is corrupt"
            )));
        }

        let mut buffers = Vec::new();
        for name in file.names().filter(|&name| name != PARAMS) {
            let Some(buffer_name) = name.strip_prefix(BUFFER_PREFIX) else {
                return Err(file.error(format!("unexpected tensor `{name}`")));
            };
            file.check_f32(name, &[n])?;
            let mut data = vec![0.0; n];
            file.read_f32_into(name, &[n], &mut data)?;
            let actual = hex::encode(sha256_f32(&data));
            match state.buffer_sha256.get(buffer_name) {
                Some(recorded) if *recorded == actual => {}
                Some(recorded) => {
                    return Err(file.error(format!(
                        "tensor `{name}` has SHA-256 {actual} but the file recorded {recorded}: \
                         the checkpoint is corrupt"
                    )));
                }
                None => {
                    return Err(file.error(format!(
                        "tensor `{name}` has no recorded hash in `{STATE_KEY}`"
                    )));
                }
            }
            buffers.push((buffer_name.to_string(), data));
        }
        if let Some(missing) = state
            .buffer_sha256
            .keys()
            .find(|k| !buffers.iter().any(|(name, _)| name == *k))
        {
            return Err(file.error(format!("missing tensor `{BUFFER_PREFIX}{missing}`")));
        }
        let optimizer_state =
            OptimizerState::from_buffers(&state.optimizer, state.optimizer_step, buffers)
                .map_err(|e| file.error(e.to_string()))?;

        Ok(Checkpoint {
            params,
            optimizer: state.optimizer,
            optimizer_state,
            global_step: state.global_step,
            epoch: state.epoch,
            step_in_epoch: state.step_in_epoch,
            run_config_json,
            metrics_history,
        })
    }
}

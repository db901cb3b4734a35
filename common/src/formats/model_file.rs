//! `model.safetensors`: a trained model that PyTorch, numpy and this program can all read.
//!
//! One F32 tensor per [`ParamLayout::tensors`] entry, named and shaped as there: the default
//! 784-400-20 model has PyTorch's VAE example names (`fc1.weight` `[400, 784]`, `fc1.bias`
//! `[400]`, `fc21.*`, `fc22.*`, `fc3.*`, `fc4.*`), so
//! `model.load_state_dict(safetensors.torch.load_file("model.safetensors"))` works unchanged.
//! Tensor data is stored in layout order, so the file's data section is exactly the flat
//! parameter vector and its SHA-256 is the [fingerprint](super::fingerprint()).
//!
//! Header metadata (all strings):
//!
//! | key                  | value                                                        |
//! |----------------------|--------------------------------------------------------------|
//! | `format`             | `pt`, which Hugging Face loaders expect of PyTorch weights   |
//! | `vae.kind`           | `model` (a checkpoint says `checkpoint`)                     |
//! | `vae.format_version` | `1`                                                          |
//! | `vae.model_config`   | the [`ModelConfig`] as JSON                                  |
//! | `vae.fingerprint`    | [`fingerprint`] of the parameters, checked on load           |
//! | anything else        | the caller's `extra` metadata (run fingerprint, epochs, ...) |
//!
//! ```
//! use std::collections::BTreeMap;
//! use common::formats::{load_model, save_model};
//! use common::model::{ModelConfig, ParamLayout};
//! let dir = tempfile::tempdir().unwrap();
//! let path = dir.path().join("model.safetensors");
//! let config = ModelConfig { input_dim: 6, hidden: vec![4], latent: 2, ..ModelConfig::default() };
//! let params = vec![0.5; ParamLayout::new(&config).len()];
//! let extra = BTreeMap::from([("epochs".to_string(), "10".to_string())]);
//! save_model(&path, &config, &params, &extra).unwrap();
//! let loaded = load_model(&path).unwrap();
//! assert_eq!((loaded.config, loaded.params, loaded.metadata), (config, params, extra));
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use super::atomic_file::write_atomic;
use super::fingerprint::fingerprint;
use super::tensor_file::{F32Tensor, TensorFile, encode};
use crate::model::ModelConfig;
use crate::model::ParamLayout;
use crate::{Error, Result};

/// The `format` value Hugging Face tooling expects of PyTorch weights.
const FORMAT_KEY: &str = "format";
const FORMAT_PT: &str = "pt";
/// Says whether a file is a model or a training checkpoint.
pub(crate) const KIND_KEY: &str = "vae.kind";
const KIND_MODEL: &str = "model";
pub(crate) const VERSION_KEY: &str = "vae.format_version";
/// The model file format this program writes and reads.
pub const FORMAT_VERSION: u32 = 1;
pub const MODEL_CONFIG_KEY: &str = "vae.model_config";
pub const FINGERPRINT_KEY: &str = "vae.fingerprint";

/// Whether `key` belongs to this module rather than to the caller's `extra` metadata.
fn is_reserved(key: &str) -> bool {
    key == FORMAT_KEY || key.starts_with("vae.")
}

/// A model read back from a file.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadedModel {
    pub config: ModelConfig,
    /// Flat, in [`ParamLayout`] order.
    pub params: Vec<f32>,
    /// The caller's `extra` metadata as saved: the file's metadata minus the keys this module
    /// owns (`format` and `vae.*`).
    pub metadata: BTreeMap<String, String>,
}

/// Writes the model to `path` atomically (temporary file in the same directory, fsync, rename).
///
/// Fails if `params` does not fit `config`, `config` is invalid, or an `extra` key is one this
/// module owns (`format` or anything starting with `vae.`).
pub fn save_model(
    path: &Path,
    config: &ModelConfig,
    params: &[f32],
    extra: &BTreeMap<String, String>,
) -> Result<()> {
    config.validate()?;
    let layout = ParamLayout::new(config);
    if params.len() != layout.len() {
        return Err(Error::Tensor(format!(
            "cannot save {}: the model has {} parameters but {} were given",
            path.display(),
            layout.len(),
            params.len()
        )));
    }
    if let Some(key) = extra.keys().find(|k| is_reserved(k)) {
        return Err(Error::Config(format!(
            "model metadata key `{key}` is reserved (`format` and `vae.*` are written by the \
             program); choose another name"
        )));
    }
    let mut metadata = extra.clone();
    metadata.insert(FORMAT_KEY.into(), FORMAT_PT.into());
    metadata.insert(KIND_KEY.into(), KIND_MODEL.into());
    metadata.insert(VERSION_KEY.into(), FORMAT_VERSION.to_string());
    metadata.insert(
        MODEL_CONFIG_KEY.into(),
        serde_json::to_string(config).expect("ModelConfig serialises to JSON"),
    );
    metadata.insert(FINGERPRINT_KEY.into(), fingerprint(params));

    let tensors = layout.tensors();
    let views: Vec<F32Tensor<'_>> = tensors
        .iter()
        .map(|t| F32Tensor {
            name: &t.name,
            shape: &t.shape,
            data: &params[t.range.clone()],
        })
        .collect();
    write_atomic(path, &encode(&views, &metadata))
}

/// Reads a model written by [`save_model`] (or any safetensors file with the same tensors and a
/// `vae.model_config` entry). Errors name the file and what is wrong: not safetensors or
/// truncated, a training checkpoint rather than a model, missing or invalid configuration, a
/// missing, unexpected, wrongly shaped or non-F32 tensor, or parameters that do not match the
/// recorded fingerprint.
///
/// The file is untrusted: nothing is allocated from a size it states before that size is checked
/// against the bytes it holds. Memory is bounded by about twice the file's size (its bytes, and
/// the parameters read from them) plus its header's strings.
pub fn load_model(path: &Path) -> Result<LoadedModel> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    load_model_from_bytes(path, bytes)
}

/// [`load_model`] on a file's contents already in memory; `path` names it in errors.
pub fn load_model_from_bytes(path: &Path, bytes: Vec<u8>) -> Result<LoadedModel> {
    let file = TensorFile::from_bytes(path, bytes)?;
    check_kind(&file, KIND_MODEL)?;
    let config_json = file.required_metadata(
        MODEL_CONFIG_KEY,
        "the model configuration is missing (was the file written by this program, or re-saved \
         without its metadata?)",
    )?;
    let config: ModelConfig = serde_json::from_str(config_json).map_err(|e| {
        file.error(format!(
            "`{MODEL_CONFIG_KEY}` is not a valid model configuration ({e}): {config_json}"
        ))
    })?;
    config
        .validate()
        .map_err(|e| file.error(format!("`{MODEL_CONFIG_KEY}`: {e}")))?;
    check_size(&file, &config)?;

    let layout = ParamLayout::new(&config);
    let tensors = layout.tensors();
    if let Some(extra) = file
        .names()
        .find(|name| !tensors.iter().any(|t| t.name == *name))
    {
        return Err(file.error(format!(
            "unexpected tensor `{extra}`: the model configuration {config_json} has tensors {}",
            tensors
                .iter()
                .map(|t| format!("`{}`", t.name))
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    // Every tensor present with its shape before the parameters are allocated: their number is
    // then the file's own tensor data.
    for t in &tensors {
        file.check_f32(&t.name, &t.shape)?;
    }
    debug_assert_eq!(param_count(&config), Some(layout.len()));
    if layout.len().checked_mul(4) != Some(file.data_len()) {
        return Err(file.error(format!(
            "the tensors hold {} bytes of data but the model's {} parameters need {}",
            file.data_len(),
            layout.len(),
            layout.len().saturating_mul(4)
        )));
    }
    let mut params = vec![0.0; layout.len()];
    for t in &tensors {
        file.read_f32_into(&t.name, &t.shape, &mut params[t.range.clone()])?;
    }
    if let Some(recorded) = file.metadata().get(FINGERPRINT_KEY) {
        let actual = fingerprint(&params);
        if *recorded != actual {
            return Err(file.error(format!(
                "the parameters' fingerprint is {actual} but the file recorded {recorded}: the \
                 file is corrupt or its tensors were changed after saving"
            )));
        }
    }
    let metadata = file
        .metadata()
        .iter()
        .filter(|(k, _)| !is_reserved(k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    Ok(LoadedModel {
        config,
        params,
        metadata,
    })
}

/// Checks, before the layout of `config` is built, that the file could hold such a model: not
/// far more layers than the file has tensors (so the layout's size is bounded by the header's),
/// and a parameter count that does not overflow (the layout adds and multiplies unchecked).
/// Whether the tensors are the right ones is checked after, by name and shape, so that a file
/// missing one tensor hears which.
fn check_size(file: &TensorFile, config: &ModelConfig) -> Result<()> {
    // Two tensors per linear layer: encoder hidden layers, mu, logvar, decoder hidden, output.
    let tensors = config
        .hidden
        .len()
        .checked_mul(2)
        .and_then(|n| n.checked_add(3))
        .and_then(|n| n.checked_mul(2));
    if tensors.is_none_or(|n| n > 2 * file.tensor_count() + 10) {
        return Err(file.error(format!(
            "the model configuration has {} hidden layers, far more than the file's {} tensors \
             can hold: the configuration does not belong to these tensors",
            config.hidden.len(),
            file.tensor_count()
        )));
    }
    if param_count(config).is_none() {
        return Err(file.error(format!(
            "the model configuration {} has more parameters than this machine can address: \
             the configuration does not belong to these tensors",
            crate::model::model_name(config)
        )));
    }
    Ok(())
}

/// The number of parameters of `config`, as [`ParamLayout::len`] computes it, or `None` on
/// overflow.
fn param_count(config: &ModelConfig) -> Option<usize> {
    let layer = |count: usize, fan_in: usize, fan_out: usize| {
        count.checked_add(fan_in.checked_mul(fan_out)?.checked_add(fan_out)?)
    };
    let mut count = 0;
    let mut prev = config.input_dim;
    for &h in &config.hidden {
        count = layer(count, prev, h)?;
        prev = h;
    }
    // mu and logvar both read the last hidden layer.
    count = layer(count, prev, config.latent)?;
    count = layer(count, prev, config.latent)?;
    let mut prev = config.latent;
    for &h in config.hidden.iter().rev() {
        count = layer(count, prev, h)?;
        prev = h;
    }
    layer(count, prev, config.input_dim)
}

/// Checks `vae.kind` (absent counts as a model) and `vae.format_version` (absent counts as 1).
pub(crate) fn check_kind(file: &TensorFile, expected: &str) -> Result<()> {
    let kind = file
        .metadata()
        .get(KIND_KEY)
        .map_or(KIND_MODEL, String::as_str);
    if kind != expected {
        let hint = match expected {
            KIND_MODEL => "use it to resume training, or pass the run's model.safetensors",
            _ => "it is not a training checkpoint; pass the run's checkpoint file",
        };
        return Err(file.error(format!(
            "this is a {kind} file, not a {expected} file: {hint}"
        )));
    }
    if let Some(version) = file.metadata().get(VERSION_KEY)
        && version.parse::<u32>() != Ok(FORMAT_VERSION)
    {
        return Err(file.error(format!(
            "format version `{version}` is not supported (this program reads version \
             {FORMAT_VERSION}); it was written by a different version of the program"
        )));
    }
    Ok(())
}

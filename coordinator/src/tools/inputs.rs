//! What the tools read: a saved model, and the held-out split of a dataset chosen the way the run
//! that trained it chose it.
//!
//! Defaults come, in order, from the command line, the model file's metadata (`seed`, `data`,
//! written by the run), the run's `config.json` beside the model (`holdout`, when its `data` is
//! the same), and finally the data source's default held-out size. So `coordinator evaluate
//! --model out/model.safetensors` evaluates on exactly the examples the run held out.

use std::path::{Path, PathBuf};

use common::data::{DataSource, Dataset, Shape};
use common::formats::load_model;
use common::model::ModelConfig;

use crate::error::{Error, Result};
use crate::outputs::CONFIG_FILE;

/// A model read from a `model.safetensors` file, with what its run recorded.
#[derive(Debug, Clone)]
pub struct SavedModel {
    pub path: PathBuf,
    pub config: ModelConfig,
    pub params: Vec<f32>,
    /// The run's seed (`seed` metadata), if recorded.
    pub seed: Option<u64>,
    /// The run's data source (`data` metadata), if recorded.
    pub data: Option<String>,
    /// The run's `config.json` beside the model, if there is one.
    run_config: Option<serde_json::Value>,
}

impl SavedModel {
    pub fn load(path: &Path) -> Result<Self> {
        let loaded = load_model(path)?;
        let seed = match loaded.metadata.get("seed") {
            Some(s) => Some(s.parse().map_err(|_| {
                Error::Config(format!(
                    "{}: metadata `seed` is `{s}`, not an integer",
                    path.display()
                ))
            })?),
            None => None,
        };
        let run_config = path
            .parent()
            .map(|dir| dir.join(CONFIG_FILE))
            .and_then(|p| std::fs::read_to_string(p).ok())
            .and_then(|text| serde_json::from_str(&text).ok());
        Ok(SavedModel {
            path: path.to_path_buf(),
            config: loaded.config,
            params: loaded.params,
            seed,
            data: loaded.metadata.get("data").cloned(),
            run_config,
        })
    }

    /// `--seed`, else the run's seed, else 0.
    pub fn seed_or(&self, flag: Option<u64>) -> u64 {
        flag.or(self.seed).unwrap_or(0)
    }

    /// `--data`, else the run's data, else `synthetic`.
    pub fn data_or(&self, flag: Option<&str>) -> String {
        flag.map(str::to_string)
            .or_else(|| self.data.clone())
            .unwrap_or_else(|| "synthetic".into())
    }

    /// The run's `--holdout`, if its `config.json` is beside the model, set one, and used `data`.
    fn run_holdout(&self, data: &str) -> Option<usize> {
        let config = self.run_config.as_ref()?;
        if config.get("data")?.as_str()? != data {
            return None;
        }
        config.get("holdout")?.as_u64().map(|h| h as usize)
    }

    /// Loads the data (`--data` or the run's), splits off the held-out examples (`--holdout`, the
    /// run's, or the source's default) and checks that they fit the model.
    pub fn heldout(&self, data: Option<&str>, holdout: Option<usize>) -> Result<Heldout> {
        let data = self.data_or(data);
        let source: DataSource = data.parse()?;
        let all = source.load()?;
        let holdout = holdout
            .or_else(|| self.run_holdout(&data))
            .unwrap_or_else(|| source.default_holdout(all.len()));
        let (_, set) = all.split_holdout(holdout)?;
        set.check_fits(&self.config.likelihood, self.config.input_dim)
            .map_err(|e| {
                Error::Config(format!(
                    "data `{data}` does not suit the model {}: {e}",
                    self.path.display()
                ))
            })?;
        tracing::info!(
            "held-out data: the last {holdout} examples of {}",
            source.describe()
        );
        Ok(Heldout {
            label_names: LabelNames::for_source(&source),
            data,
            holdout,
            set,
        })
    }
}

/// The held-out examples of a dataset.
#[derive(Debug)]
pub struct Heldout {
    /// The data source as given (`synthetic`, `npy:...`).
    pub data: String,
    /// How many examples were held out.
    pub holdout: usize,
    pub set: Dataset,
    pub label_names: LabelNames,
}

/// How to name a class label in a legend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LabelNames {
    /// The synthetic data's shapes (`circle`, `square`, ...).
    Shapes,
    /// MNIST digits (`digit 3`).
    Digits,
    /// Anything else (`label 3`).
    Numbers,
}

impl LabelNames {
    pub fn for_source(source: &DataSource) -> Self {
        match source {
            DataSource::Synthetic { .. } => LabelNames::Shapes,
            DataSource::Mnist { .. } => LabelNames::Digits,
            _ => LabelNames::Numbers,
        }
    }

    pub fn name(&self, label: u8) -> String {
        match self {
            LabelNames::Shapes => Shape::from_label(label)
                .map_or_else(|| format!("label {label}"), |s| s.name().to_string()),
            LabelNames::Digits => format!("digit {label}"),
            LabelNames::Numbers => format!("label {label}"),
        }
    }
}

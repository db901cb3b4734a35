//! `coordinator evaluate`: the held-out ELBO and importance-weighted bound of a saved model.

use std::path::PathBuf;

use common::model::EvalReport;
use common::train::Engine;
use serde::{Deserialize, Serialize};

use super::inputs::SavedModel;
use crate::error::Result;

/// Print the held-out ELBO and importance-weighted bound of a saved model.
///
/// Evaluates the model on the held-out split: the mean ELBO (with its reconstruction and KL
/// parts) and the importance-weighted bound log (1/k) sum_j p(x, z_j) / q(z_j | x), in nats per
/// example.
///
/// It runs the same evaluation as training (same noise, keyed by --seed, default the run's), so
/// for the run's data and held-out split it reproduces the run's final held-out figures bit for
/// bit.
#[derive(Debug, Clone, clap::Args)]
pub struct EvaluateArgs {
    /// The trained model (a run's `model.safetensors`).
    #[arg(long)]
    pub model: PathBuf,
    /// Data: `synthetic`, `idx:IMAGES[,LABELS]`, `npy:PATH[,LABELS]`, `mnist[:DIR]` [default:
    /// the data the model was trained on].
    #[arg(long)]
    pub data: Option<String>,
    /// Held-out examples at the end of the data [default: the run's, else 10000 for synthetic
    /// and mnist, a tenth otherwise].
    #[arg(long)]
    pub holdout: Option<usize>,
    /// Importance samples per example for the bound (0 skips it).
    #[arg(long, default_value_t = 100)]
    pub iw_samples: usize,
    /// Seed of the evaluation noise [default: the run's seed recorded in the model, else 0].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Print one JSON object instead of a sentence.
    #[arg(long)]
    pub json: bool,
}

/// What `evaluate` reports (the `--json` output).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    pub model: PathBuf,
    pub data: String,
    pub holdout: usize,
    pub seed: u64,
    /// Examples, ELBO, reconstruction and KL (means per example, nats), the IW bound.
    #[serde(flatten)]
    pub report: EvalReport,
}

impl std::fmt::Display for Evaluation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "held-out ELBO {:.4} nats/example (reconstruction {:.4}, KL {:.4})",
            self.report.elbo, self.report.recon, self.report.kl
        )?;
        if let Some(bound) = self.report.iw_bound {
            write!(f, ", IW bound (k={}) {bound:.4}", self.report.iw_samples)?;
        }
        write!(
            f,
            "; {} examples (the last {} of {}), seed {}",
            self.report.examples, self.holdout, self.data, self.seed
        )
    }
}

/// Evaluates the model at `args.model` as `args` says.
pub fn evaluate(args: &EvaluateArgs) -> Result<Evaluation> {
    let model = SavedModel::load(&args.model)?;
    let seed = model.seed_or(args.seed);
    let heldout = model.heldout(args.data.as_deref(), args.holdout)?;
    // K (training samples per example) does not enter the evaluation, which uses K = 1.
    let engine = Engine::new(model.config.clone(), 1, seed)?;
    let report = engine.evaluate(&model.params, heldout.set.pixels(), args.iw_samples)?;
    Ok(Evaluation {
        model: args.model.clone(),
        data: heldout.data,
        holdout: heldout.holdout,
        seed,
        report,
    })
}

pub fn run(args: &EvaluateArgs) -> Result<()> {
    let evaluation = evaluate(args)?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string(&evaluation).expect("evaluation serialises")
        );
    } else {
        println!("{evaluation}");
    }
    Ok(())
}

//! The command line, converted into a [`TrainConfig`].

use std::path::PathBuf;

use clap::Parser;
use common::data::DataSource;
use common::model::Likelihood;
use common::optim::OptimizerConfig;

use crate::config::{TrainConfig, Transport};
use crate::error::{Error, Result};

/// `--likelihood`: the observation model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LikelihoodKind {
    /// Pixels in [0, 1]; the decoder outputs logits.
    Bernoulli,
    /// N(x | f(z), c I) with c from --gaussian-variance.
    Gaussian,
}

/// `--optimizer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OptimizerKind {
    /// Adam (AdamW with --weight-decay).
    Adam,
    /// SGD with --momentum.
    Sgd,
}

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// `--data`, parsed at the edge so a typo fails before anything loads.
fn data_source(s: &str) -> std::result::Result<DataSource, String> {
    s.parse().map_err(|e: common::Error| e.to_string())
}

/// `--hidden 512,256`.
fn hidden_sizes(s: &str) -> std::result::Result<Vec<usize>, String> {
    common::model::parse_hidden(s).map_err(|e| e.to_string())
}

/// Trains a VAE with data-parallel workers. The trained parameters are bit-identical whatever
/// the number of workers or failures along the way.
///
/// Quick start: `coordinator --workers 4 --local` trains on the built-in synthetic data with four
/// local worker processes and writes metrics, the model and a summary into `--out`.
#[derive(Debug, Parser)]
// A flag given twice takes its last value, so scripts can append overrides.
#[command(
    version,
    about,
    long_about,
    args_conflicts_with_subcommands = true,
    args_override_self = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Log lines on stderr: `text` (coloured only on a terminal and without NO_COLOR) or `json`
    /// (one object per line, for log collectors).
    #[arg(
        long,
        global = true,
        value_enum,
        default_value_t = LogFormat::Text,
        env = "VAE_LOG_FORMAT"
    )]
    pub log_format: LogFormat,
    /// Read settings from a TOML file keyed like these flags (`epochs = 3`, `hidden = [512, 256]`);
    /// flags given as well override it. A run writes its own as `config.toml` in --out.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Workers to wait for before training starts.
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// Spawn the workers as local processes (and listen on a free loopback port unless --listen
    /// is given).
    #[arg(long)]
    pub local: bool,
    /// Address to listen on [default: 127.0.0.1:50051]; port 0 picks a free port (the bound
    /// address is printed). Beyond loopback it needs a token or TLS (or --insecure).
    #[arg(long)]
    pub listen: Option<String>,
    /// Training data: `synthetic` (built in), `synthetic:N` (its first N examples),
    /// `idx:IMAGES[,LABELS]`, `npy:PATH[,LABELS]`, `mnist[:DIR]` (downloaded and cached).
    #[arg(long, default_value = "synthetic", value_parser = data_source)]
    pub data: DataSource,
    /// Held-out examples, taken from the end of the data [default: 10000 for synthetic and
    /// mnist, otherwise a tenth].
    #[arg(long)]
    pub holdout: Option<usize>,
    #[arg(long, default_value_t = 10)]
    pub epochs: u64,
    /// Global batch size (over all workers); a multiple of --shards.
    #[arg(long, default_value_t = 128)]
    pub batch: usize,
    /// Learning rate.
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    #[arg(long, value_enum, default_value_t = OptimizerKind::Adam)]
    pub optimizer: OptimizerKind,
    /// Momentum for SGD [default: 0.9].
    #[arg(long)]
    pub momentum: Option<f64>,
    /// Weight decay (decoupled for Adam, i.e. AdamW; L2 for SGD).
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Clip the gradient's global L2 norm to this value.
    #[arg(long)]
    pub clip_norm: Option<f64>,
    /// Latent dimensions.
    #[arg(long, default_value_t = 20)]
    pub latent: usize,
    /// Hidden layer sizes, e.g. `400` or `512,256` (the decoder mirrors them).
    // Spelled `::std::vec::Vec` so clap takes the list as one value, not a repeated flag.
    #[arg(long, default_value = "400", value_parser = hidden_sizes)]
    pub hidden: ::std::vec::Vec<usize>,
    /// Observation model.
    #[arg(long, value_enum, default_value_t = LikelihoodKind::Bernoulli)]
    pub likelihood: LikelihoodKind,
    /// Fixed variance c of the gaussian observation model [default: 1].
    #[arg(long)]
    pub gaussian_variance: Option<f64>,
    /// Monte-Carlo samples per example (K).
    #[arg(long, default_value_t = 1)]
    pub samples: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Virtual shards; independent of the number of workers, fixes the reduction order.
    #[arg(long, default_value_t = 16)]
    pub shards: usize,
    /// Importance samples for the final held-out bound (0 to skip).
    #[arg(long, default_value_t = 100)]
    pub iw_samples: usize,
    /// Output directory.
    #[arg(long, default_value = "out")]
    pub out: PathBuf,
    /// Threads per local worker [default: cores / workers, at least 2 on a machine with 2 cores].
    #[arg(long)]
    pub worker_threads: Option<usize>,
    /// Steps between checkpoints (0: none by step count).
    #[arg(long, default_value_t = 0)]
    pub checkpoint_every: u64,
    /// Seconds since the last checkpoint before the next (0: none by the clock). With
    /// --checkpoint-every too, whichever comes first; epoch ends always checkpoint.
    #[arg(long, default_value_t = 30.0)]
    pub checkpoint_seconds: f64,
    /// Seconds without a heartbeat before a worker is declared lost.
    #[arg(long, default_value_t = 3.0)]
    pub worker_timeout: f64,
    /// Seconds to wait with no worker at all before stopping with a checkpoint.
    #[arg(long, default_value_t = 60.0)]
    pub no_worker_timeout: f64,
    /// Continue from the checkpoint in --out (starts fresh when there is none; falls back to the
    /// previous checkpoint when the newest cannot be read).
    #[arg(long)]
    pub resume: bool,
    /// Start afresh in an --out that holds another run's results (a checkpoint, model, summary or
    /// metrics), which is otherwise refused: that run's checkpoints, model, summary, metrics and
    /// settings files are deleted first (other files stay). Only on the command line, never in a
    /// settings file.
    #[arg(long, conflicts_with = "resume")]
    pub force: bool,
    /// Redraw samples, reconstructions and curves in --out after every epoch (always at the end).
    #[arg(long)]
    pub pictures_every_epoch: bool,
    /// Continue training a saved model: start from the parameters in this `model.safetensors`
    /// (with a fresh optimizer state); its architecture must match the model settings.
    #[arg(long)]
    pub init_from: Option<PathBuf>,
    /// How tensors reach the workers: `auto` uses shared memory for workers on this host that
    /// can see it (same results, less copying) and gRPC for the rest.
    #[arg(long, value_enum, default_value_t = Transport::Auto)]
    pub transport: Transport,
    /// Shared secret every call must present. Visible to other local users in `ps`: prefer
    /// --token-file or the VAE_TOKEN variable.
    #[arg(
        long,
        env = "VAE_TOKEN",
        hide_env_values = true,
        conflicts_with = "token_file"
    )]
    pub token: Option<String>,
    /// Read the shared secret from this file (surrounding whitespace ignored), e.g. one made by
    /// `openssl rand -hex 32 > token`.
    #[arg(long, env = "VAE_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// TLS: the coordinator's certificate chain (PEM). Needs --tls-key.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// TLS: the private key of --tls-cert (PEM).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Mutual TLS: refuse workers whose certificate this CA (PEM) did not sign.
    #[arg(long, requires = "tls_cert")]
    pub tls_ca: Option<PathBuf>,
    /// Listen beyond loopback with neither a token nor TLS (only on a network you trust).
    #[arg(long)]
    pub insecure: bool,
    /// Refuse registrations beyond this many live workers.
    #[arg(long, default_value_t = 256)]
    pub max_workers: usize,
    /// Close connections beyond this many on accept.
    #[arg(long, default_value_t = 1024)]
    pub max_connections: usize,
    /// Fraction of tree nodes (0 to 1) also computed by a second worker and compared bit for bit;
    /// on a mismatch the coordinator computes the node itself and quarantines the worker that
    /// was wrong. Which nodes is secret to the coordinator.
    #[arg(long, default_value_t = 0.0)]
    pub verify: f64,
    /// Seconds after which a connection that sends nothing is closed.
    #[arg(long, default_value_t = 30.0)]
    pub idle_timeout: f64,
    /// Serve Prometheus metrics (`GET /metrics`, text format) on this address, e.g.
    /// 127.0.0.1:9464; port 0 picks a free port (the bound address is printed). No token: it
    /// shows only training figures.
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<String>,
}

/// Tools besides training.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Exit 0 if a coordinator accepts connections at --addr (a container health check).
    Health {
        #[arg(long, default_value = "127.0.0.1:50051")]
        addr: String,
    },
    // Tools over a trained model (`crate::tools`); each one's --help is its Args struct's doc.
    Sample(crate::tools::samples::SampleArgs),
    Reconstruct(crate::tools::reconstruct::ReconstructArgs),
    Traverse(crate::tools::traverse::TraverseArgs),
    Scatter(crate::tools::scatter::ScatterArgs),
    Evaluate(crate::tools::evaluate::EvaluateArgs),
    Plot(crate::tools::plot::PlotArgs),
}

impl Cli {
    pub fn into_config(self) -> Result<TrainConfig> {
        let optimizer = match self.optimizer {
            OptimizerKind::Adam => {
                if self.momentum.is_some() {
                    return Err(Error::Config(
                        "--momentum applies to --optimizer sgd, not adam".into(),
                    ));
                }
                match OptimizerConfig::adam(self.lr) {
                    OptimizerConfig::Adam {
                        lr,
                        beta1,
                        beta2,
                        eps,
                        ..
                    } => OptimizerConfig::Adam {
                        lr,
                        beta1,
                        beta2,
                        eps,
                        weight_decay: self.weight_decay,
                    },
                    other => other,
                }
            }
            OptimizerKind::Sgd => match OptimizerConfig::sgd(self.lr, self.momentum.unwrap_or(0.9))
            {
                OptimizerConfig::Sgd {
                    lr,
                    momentum,
                    dampening,
                    nesterov,
                    ..
                } => OptimizerConfig::Sgd {
                    lr,
                    momentum,
                    dampening,
                    nesterov,
                    weight_decay: self.weight_decay,
                },
                other => other,
            },
        };
        let likelihood = match (self.likelihood, self.gaussian_variance) {
            (LikelihoodKind::Bernoulli, None) => Likelihood::Bernoulli,
            (LikelihoodKind::Bernoulli, Some(_)) => {
                return Err(Error::Config(
                    "--gaussian-variance applies to --likelihood gaussian, not bernoulli".into(),
                ));
            }
            (LikelihoodKind::Gaussian, variance) => Likelihood::Gaussian {
                variance: variance.unwrap_or(1.0),
            },
        };
        let listen = self.listen.unwrap_or_else(|| {
            if self.local {
                "127.0.0.1:0".into()
            } else {
                "127.0.0.1:50051".into()
            }
        });
        let config = TrainConfig {
            data: self.data,
            holdout: self.holdout,
            epochs: self.epochs,
            batch: self.batch,
            hidden: self.hidden,
            latent: self.latent,
            likelihood,
            samples: self.samples,
            seed: self.seed,
            shards: self.shards,
            optimizer,
            clip_norm: self.clip_norm,
            iw_samples: self.iw_samples,
            workers: self.workers,
            listen,
            local: self.local,
            worker_threads: self.worker_threads,
            out: self.out,
            checkpoint_every: self.checkpoint_every,
            checkpoint_seconds: self.checkpoint_seconds,
            worker_timeout_secs: self.worker_timeout,
            no_worker_timeout_secs: self.no_worker_timeout,
            resume: self.resume,
            force: self.force,
            init_from: self.init_from,
            pictures_every_epoch: self.pictures_every_epoch,
            transport: self.transport,
            token: match &self.token_file {
                Some(path) => Some(
                    proto::credentials::read_token_file(path)
                        .map_err(|e| Error::Config(format!("--token-file: {e}")))?,
                ),
                None => self.token.filter(|t| !t.is_empty()),
            },
            token_file: self.token_file,
            tls: match (self.tls_cert, self.tls_key) {
                (Some(cert), Some(key)) => Some(crate::config::ServerTls {
                    cert,
                    key,
                    client_ca: self.tls_ca,
                }),
                _ => None,
            },
            insecure: self.insecure,
            max_workers: self.max_workers,
            max_connections: self.max_connections,
            idle_timeout_secs: self.idle_timeout,
            verify: self.verify,
            metrics_addr: self.metrics_addr,
        };
        config.validate()?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(args: &[&str]) -> std::result::Result<TrainConfig, String> {
        let cli = Cli::try_parse_from(std::iter::once("coordinator").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        cli.into_config().map_err(|e| e.to_string())
    }

    /// A misspelt choice is refused, and the message names what was wrong and what is valid.
    fn refused(args: &[&str], wants: &[&str]) {
        let e = config(args).unwrap_err();
        for want in wants {
            assert!(e.contains(want), "{args:?}: `{want}` missing from: {e}");
        }
    }

    #[test]
    fn every_misspelt_choice_is_refused_with_the_valid_values() {
        refused(
            &["--likelihood", "gausian"],
            &["gausian", "bernoulli", "gaussian"],
        );
        refused(&["--optimizer", "adamw"], &["adamw", "adam", "sgd"]);
        refused(&["--transport", "shm"], &["shm", "auto", "tcp"]);
        refused(
            &["--data", "synthetc"],
            &["synthetc", "synthetic", "idx:", "npy:"],
        );
        refused(&["--data", "synthetic:0"], &["positive"]);
        refused(&["--hidden", "400,x"], &["`x` is not a layer size"]);
        refused(&["--hidden", "400,0"], &["size 0"]);
        refused(&["--gaussian-variance", "0.5"], &["--likelihood gaussian"]);
        refused(&["--momentum", "0.5"], &["--optimizer sgd"]);
        refused(&["--batch", "100"], &["multiple of --shards"]);
        refused(&["--epochs", "0"], &["--epochs"]);
        refused(&["--lr=-1"], &["learning rate"]);
        refused(&["--clip-norm", "0"], &["--clip-norm"]);
        refused(
            &["--checkpoint-seconds=-1"],
            &["--checkpoint-seconds", "-1"],
        );
        refused(
            &["--checkpoint-seconds", "NaN"],
            &["--checkpoint-seconds", "NaN"],
        );
        refused(
            &["--checkpoint-seconds", "1e300"],
            &["--checkpoint-seconds", "1e300"],
        );
        // Seconds beyond `Duration`'s range are refused, not a panic when the run starts.
        refused(
            &["--worker-timeout", "1e300"],
            &["--worker-timeout", "1e300"],
        );
        refused(
            &["--no-worker-timeout", "inf"],
            &["--no-worker-timeout", "inf"],
        );
        refused(
            &["--worker-timeout", "0"],
            &["--worker-timeout", "positive"],
        );
        refused(&["--idle-timeout", "1e30"], &["--idle-timeout", "1e30"]);
        refused(
            &["--likelihood", "gaussian", "--gaussian-variance=-1"],
            &["variance"],
        );
    }

    #[test]
    fn choices_become_typed_settings() {
        let c = config(&[
            "--likelihood",
            "gaussian",
            "--gaussian-variance",
            "0.1",
            "--optimizer",
            "sgd",
            "--momentum",
            "0.5",
            "--hidden",
            "512, 256",
            "--data",
            "synthetic:2000",
            "--transport",
            "tcp",
        ])
        .unwrap();
        assert_eq!(c.likelihood, Likelihood::Gaussian { variance: 0.1 });
        assert_eq!(c.optimizer, OptimizerConfig::sgd(1e-3, 0.5));
        assert_eq!(c.hidden, vec![512, 256]);
        assert_eq!(c.data, DataSource::Synthetic { examples: 2000 });
        assert_eq!(c.transport, Transport::Tcp);
        let d = config(&[]).unwrap();
        assert_eq!(d.likelihood, Likelihood::Bernoulli);
        assert_eq!(d.optimizer, OptimizerConfig::adam(1e-3));
        assert_eq!(d.transport, Transport::Auto);
        assert_eq!(
            config(&["--likelihood", "gaussian"]).unwrap().likelihood,
            Likelihood::Gaussian { variance: 1.0 }
        );
    }
}

//! The run's configuration: what the command line sets, validated, and saved beside the outputs.

use std::path::PathBuf;
use std::time::Duration;

use common::data::DataSource;
use common::model::{Likelihood, ModelConfig};
use common::optim::OptimizerConfig;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// How tensors travel between the coordinator and its workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// Shared memory for workers on this host that can see it, gRPC for the rest.
    #[default]
    Auto,
    /// gRPC for every worker.
    Tcp,
}

/// TLS on the coordinator's listener (PEM files).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// CA of worker certificates: set for mutual TLS (workers without one are refused).
    pub client_ca: Option<PathBuf>,
}

/// Everything a run needs, typed: every choice was parsed and checked at the edge. Saved as
/// `config.json` in the output directory, which reads back into the same settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Written as the command line spells it (`synthetic`, `idx:IMAGES[,LABELS]`, ...).
    #[serde(with = "as_string")]
    pub data: DataSource,
    /// Held-out examples (the dataset's tail); `None` for the dataset's default.
    pub holdout: Option<usize>,
    pub epochs: u64,
    /// Global batch: examples per step over all workers.
    pub batch: usize,
    pub hidden: Vec<usize>,
    pub latent: usize,
    pub likelihood: Likelihood,
    /// Monte-Carlo samples per example (K).
    pub samples: usize,
    pub seed: u64,
    /// Virtual shards (independent of the number of workers).
    pub shards: usize,
    pub optimizer: OptimizerConfig,
    pub clip_norm: Option<f64>,
    /// Importance samples for the final held-out bound (0: skip).
    pub iw_samples: usize,
    /// Workers to wait for before training starts.
    pub workers: usize,
    pub listen: String,
    /// Spawn the workers as local processes.
    pub local: bool,
    /// Threads per local worker (default: cores / workers, at least 1).
    pub worker_threads: Option<usize>,
    pub out: PathBuf,
    /// Steps between checkpoints (0: none by step count).
    pub checkpoint_every: u64,
    /// Seconds since the last checkpoint before the next (0: none by the clock).
    #[serde(default = "default_checkpoint_seconds")]
    pub checkpoint_seconds: f64,
    pub worker_timeout_secs: f64,
    pub no_worker_timeout_secs: f64,
    pub resume: bool,
    /// A fresh run may replace another run's files in `out` (deleting them first). Never saved:
    /// `config.json` and `config.toml` describe the run, and a run repeated from them must not
    /// delete outputs without being told so again on its own command line.
    #[serde(skip)]
    pub force: bool,
    /// Redraw the run's pictures after every epoch, not only at the end.
    pub pictures_every_epoch: bool,
    pub transport: Transport,
    /// Start from the parameters of a saved `model.safetensors` instead of a fresh initialisation.
    pub init_from: Option<PathBuf>,
    /// Where the token was read from; the token itself is never written to disk.
    pub token_file: Option<PathBuf>,
    /// Shared secret every call must present; never written to disk.
    #[serde(skip)]
    pub token: Option<String>,
    pub tls: Option<ServerTls>,
    /// Listen beyond loopback with neither a token nor TLS.
    pub insecure: bool,
    /// Registrations beyond this many live workers are refused.
    pub max_workers: usize,
    /// Connections beyond this many are closed on accept.
    pub max_connections: usize,
    /// A connection that sends nothing for this long is closed.
    pub idle_timeout_secs: f64,
    /// Serve Prometheus metrics at `GET /metrics` on this address (`None`: no endpoint). Not
    /// part of [`Self::identity`]: watching a run changes nothing in it.
    #[serde(default)]
    pub metrics_addr: Option<String>,
    /// Fraction of tree nodes computed by a second worker and compared bit for bit.
    #[serde(default)]
    pub verify: f64,
}

/// The longest any seconds flag may be (about 31 years): far below where `Duration` conversion or
/// `Instant` arithmetic overflows (2^63 s), which would panic.
const MAX_SECONDS: f64 = 1e9;

/// The default time between checkpoints. A checkpoint of the default model costs the steps beside
/// it 10-20 ms on a 2-vCPU Xeon or Zen 5 (docs/scaling.md §33, §34): every 200 steps, the default
/// before this one, that was 2-3% of training; every 30 s it is under 0.1%, and a crash of the
/// coordinator loses about 30 s of training (plus a step and the write).
fn default_checkpoint_seconds() -> f64 {
    30.0
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            data: DataSource::default(),
            holdout: None,
            epochs: 10,
            batch: 128,
            hidden: vec![400],
            latent: 20,
            likelihood: Likelihood::Bernoulli,
            samples: 1,
            seed: 0,
            shards: 16,
            optimizer: OptimizerConfig::adam(1e-3),
            clip_norm: None,
            iw_samples: 100,
            workers: 1,
            listen: "127.0.0.1:50051".into(),
            local: false,
            worker_threads: None,
            out: PathBuf::from("out"),
            checkpoint_every: 0,
            checkpoint_seconds: default_checkpoint_seconds(),
            worker_timeout_secs: 3.0,
            no_worker_timeout_secs: 60.0,
            resume: false,
            force: false,
            init_from: None,
            pictures_every_epoch: false,
            transport: Transport::Auto,
            token_file: None,
            token: None,
            tls: None,
            insecure: false,
            max_workers: 256,
            max_connections: 1024,
            idle_timeout_secs: 30.0,
            verify: 0.0,
            metrics_addr: None,
        }
    }
}

impl TrainConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::Config(msg));
        if self.epochs == 0 {
            return bad("--epochs must be at least 1".into());
        }
        if self.workers == 0 {
            return bad("--workers must be at least 1".into());
        }
        if self.samples == 0 {
            return bad("--samples must be at least 1".into());
        }
        if self.shards == 0 || self.batch == 0 || !self.batch.is_multiple_of(self.shards) {
            return bad(format!(
                "--batch {} must be a positive multiple of --shards {}",
                self.batch, self.shards
            ));
        }
        for (flag, seconds) in [
            ("--worker-timeout", self.worker_timeout_secs),
            ("--no-worker-timeout", self.no_worker_timeout_secs),
        ] {
            // Beyond `Duration`'s range the conversion would panic.
            if !(seconds > 0.0 && seconds <= MAX_SECONDS) {
                return bad(format!(
                    "{flag} must be a positive number of seconds, at most {MAX_SECONDS:e}; got \
                     {seconds:?}"
                ));
            }
        }
        if !(self.checkpoint_seconds == 0.0
            || (1e-3..=MAX_SECONDS).contains(&self.checkpoint_seconds))
        {
            return bad(format!(
                "--checkpoint-seconds must be 0 (no checkpoints by the clock) or from 0.001 to \
                 {MAX_SECONDS:e} seconds; got {:?}",
                self.checkpoint_seconds
            ));
        }
        if !(0.0..=1.0).contains(&self.verify) {
            return bad(format!(
                "--verify is the fraction of nodes to verify, from 0 to 1; got {}",
                self.verify
            ));
        }
        if let Some(c) = self.clip_norm
            && !(c.is_finite() && c > 0.0)
        {
            return bad(format!("--clip-norm must be positive, got {c}"));
        }
        self.optimizer.validate().map_err(Error::from)?;
        self.model(784).validate().map_err(Error::from)?;
        self.validate_exposure()
    }

    /// Who can reach the listener, and what protects it. Beyond loopback, anyone on the network
    /// could otherwise download the data and feed the run gradients.
    fn validate_exposure(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::Config(msg));
        if let Some(token) = &self.token {
            proto::credentials::Token::new(token).map_err(Error::Config)?;
        }
        if self.max_workers == 0 || self.max_connections == 0 {
            return bad("--max-workers and --max-connections must be at least 1".into());
        }
        if self.workers > self.max_workers {
            return bad(format!(
                "--workers {} is more than --max-workers {}",
                self.workers, self.max_workers
            ));
        }
        if !(1.0..=MAX_SECONDS).contains(&self.idle_timeout_secs) {
            return bad(format!(
                "--idle-timeout must be from 1 to {MAX_SECONDS:e} seconds, got {:?}",
                self.idle_timeout_secs
            ));
        }
        if self.local && self.tls.is_some() {
            return bad(
                "--local workers talk to the coordinator over loopback and take no TLS \
                 settings: drop --local, or drop --tls-cert/--tls-key"
                    .into(),
            );
        }
        let protected = self.token.is_some() || self.tls.is_some();
        if !protected && !self.insecure && !is_loopback(&self.listen) {
            return bad(format!(
                "refusing to listen on {} with neither a token nor TLS: anyone who reaches that \
                 address could download the training data and send the run gradients. Give a \
                 token (--token-file, see README \"Security\") or TLS (--tls-cert, --tls-key), \
                 listen on 127.0.0.1, or pass --insecure on a network you trust",
                self.listen
            ));
        }
        Ok(())
    }

    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.idle_timeout_secs)
    }

    /// The model for data of `input_dim` values per example.
    pub fn model(&self, input_dim: usize) -> ModelConfig {
        ModelConfig {
            input_dim,
            hidden: self.hidden.clone(),
            latent: self.latent,
            likelihood: self.likelihood,
        }
    }

    pub fn worker_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.worker_timeout_secs)
    }

    pub fn no_worker_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.no_worker_timeout_secs)
    }

    /// How long training goes between checkpoints by the clock (`None`: not by the clock).
    pub fn checkpoint_interval(&self) -> Option<Duration> {
        Duration::try_from_secs_f64(self.checkpoint_seconds)
            .ok()
            .filter(|interval| !interval.is_zero())
    }

    /// The settings that determine the trained parameters. Two runs with equal identities
    /// produce bit-identical parameters; a resumed run must match its checkpoint's.
    pub fn identity(&self) -> serde_json::Value {
        serde_json::json!({
            "data": self.data.to_string(),
            "holdout": self.holdout,
            "batch": self.batch,
            "hidden": self.hidden,
            "latent": self.latent,
            "likelihood": self.likelihood,
            "samples": self.samples,
            "seed": self.seed,
            "shards": self.shards,
            "optimizer": self.optimizer,
            "clip_norm": self.clip_norm,
            "init_from": self.init_from,
        })
    }

    /// SHA-256 of [`Self::identity`]: sent to workers so a worker never mixes runs.
    pub fn run_id(&self) -> String {
        let bytes = serde_json::to_vec(&self.identity()).expect("JSON of plain values");
        hex::encode(Sha256::digest(bytes))
    }
}

/// Whether `listen` (`ip:port` or `host:port`) only accepts connections from this host.
pub fn is_loopback(listen: &str) -> bool {
    if let Ok(addr) = listen.parse::<std::net::SocketAddr>() {
        return addr.ip().is_loopback();
    }
    listen
        .rsplit_once(':')
        .is_some_and(|(host, _)| host.eq_ignore_ascii_case("localhost"))
}

/// Serde through `Display` and `FromStr`: a setting is written as the command line spells it.
mod as_string {
    use std::fmt::Display;
    use std::str::FromStr;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<T: Display, S: Serializer>(value: &T, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(value)
    }

    pub fn deserialize<'de, T, D>(d: D) -> Result<T, D::Error>
    where
        T: FromStr<Err: Display>,
        D: Deserializer<'de>,
    {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_json_reads_back_into_the_same_settings() {
        let config = TrainConfig {
            data: "idx:a.gz,b.gz".parse().unwrap(),
            likelihood: Likelihood::Gaussian { variance: 0.1 },
            optimizer: OptimizerConfig::sgd(0.05, 0.8),
            hidden: vec![512, 256],
            clip_norm: Some(2.0),
            transport: Transport::Tcp,
            ..TrainConfig::default()
        };
        let json = serde_json::to_string_pretty(&config).unwrap();
        assert!(json.contains("\"data\": \"idx:a.gz,b.gz\""), "{json}");
        let back: TrainConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(back, config);
        let unknown = json.replacen("\"epochs\"", "\"epochz\"", 1);
        let e = serde_json::from_str::<TrainConfig>(&unknown).unwrap_err();
        assert!(e.to_string().contains("epochz"), "{e}");
        let misspelt = json.replacen("\"tcp\"", "\"tcpp\"", 1);
        assert!(serde_json::from_str::<TrainConfig>(&misspelt).is_err());
    }

    #[test]
    fn defaults_are_valid_and_identity_ignores_worker_count() {
        let a = TrainConfig::default();
        a.validate().unwrap();
        let b = TrainConfig {
            workers: 4,
            local: true,
            epochs: 3,
            ..a.clone()
        };
        assert_eq!(a.run_id(), b.run_id());
        let c = TrainConfig {
            seed: 1,
            ..a.clone()
        };
        assert_ne!(a.run_id(), c.run_id());
    }

    #[test]
    fn an_exposed_listener_needs_a_token_tls_or_insecure() {
        let open = TrainConfig {
            listen: "0.0.0.0:50051".into(),
            ..TrainConfig::default()
        };
        let e = open.validate().unwrap_err().to_string();
        assert!(
            e.contains("0.0.0.0:50051") && e.contains("--insecure"),
            "{e}"
        );
        for listen in ["127.0.0.1:0", "[::1]:50051", "localhost:50051"] {
            let local = TrainConfig {
                listen: listen.into(),
                ..TrainConfig::default()
            };
            local.validate().unwrap();
        }
        for ok in [
            TrainConfig {
                token: Some("s3cret".into()),
                ..open.clone()
            },
            TrainConfig {
                insecure: true,
                ..open.clone()
            },
            TrainConfig {
                tls: Some(ServerTls {
                    cert: "c.pem".into(),
                    key: "k.pem".into(),
                    client_ca: None,
                }),
                ..open.clone()
            },
        ] {
            ok.validate().unwrap();
        }
        let spaced = TrainConfig {
            token: Some("two words".into()),
            ..open
        };
        assert!(
            spaced
                .validate()
                .unwrap_err()
                .to_string()
                .contains("printable")
        );
    }

    #[test]
    fn rejects_uneven_batches() {
        let c = TrainConfig {
            batch: 100,
            shards: 16,
            ..TrainConfig::default()
        };
        assert!(c.validate().unwrap_err().to_string().contains("multiple"));
    }
}

//! A training run: `prepare` loads data and state without opening a socket; `serve` listens,
//! optionally spawns local workers, and drives the state machine until the run ends (the loop
//! itself is `driver.rs`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::data::{DataSource, Dataset};
use common::formats::fingerprint;
use common::train::{Engine, ShardPlan};
use proto::credentials::Token;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

use crate::checkpoint_writer::CheckpointWriter;
use crate::config::TrainConfig;
use crate::error::{Error, Result};
use crate::gate::{Gate, GateLayer, SMALL_REQUEST_BYTES};
use crate::listener::{self, ConnectionLimits};
use crate::metrics::{Metrics, Throughput};
use crate::outputs::{self, EpochMetrics, Heldout, MetricsLog, Summary, TimeSplit};
use crate::progress::Progress;
use crate::service::{Shared, TrainerService};
use crate::sessions::Sessions;
use crate::state::{EpochTotals, Phase, Position, StateConfig, StateMachine};

mod driver;

use driver::Driver;

/// How long the server keeps answering after training ends, so every worker hears `Done`
/// (workers heartbeat every 0.5 s and long-poll for at most 2 s).
const SHUTDOWN_GRACE: Duration = Duration::from_millis(2500);

/// Concurrent calls one connection may have open. A worker needs three (long poll, heartbeat,
/// and a submit or shard download); more only serve a flood.
const MAX_STREAMS_PER_CONNECTION: u32 = 16;

/// What a checkpoint carries besides parameters and optimizer state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct RunState {
    identity: serde_json::Value,
    epoch_totals: EpochTotals,
    run_time: TimeSplit,
    run_examples: u64,
}

/// The sections of [`RunState`] made only of figures (sums and times for the reports).
const FIGURES: [&str; 2] = ["epoch_totals", "run_time"];

impl RunState {
    /// The JSON stored in a checkpoint. JSON has no NaN or infinity (serde_json writes `null`,
    /// which does not read back as a number), so a non-finite figure is stored as 0 with a
    /// warning: the figures feed only the reports, never the parameters, and the checkpoint stays
    /// resumable.
    fn to_json(&self) -> String {
        let mut value = serde_json::to_value(self).expect("run state serialises");
        let repaired = repair_figures(&mut value);
        if !repaired.is_empty() {
            tracing::warn!(
                "run figures {} are not finite: stored as 0 in the checkpoint so that --resume \
                 can read it (the reported figures of this epoch are off; the parameters are not \
                 affected)",
                repaired.join(", ")
            );
        }
        value.to_string()
    }

    /// Reads [`to_json`](Self::to_json)'s output. A `null` figure (a non-finite value stored by
    /// an earlier version) reads as 0, with a warning.
    fn from_json(json: &str, path: &std::path::Path) -> Result<Self> {
        let unreadable = |e: serde_json::Error| {
            Error::Config(format!(
                "checkpoint {} has unreadable run state: {e}",
                path.display()
            ))
        };
        let mut value: serde_json::Value = serde_json::from_str(json).map_err(unreadable)?;
        let repaired = repair_figures(&mut value);
        if !repaired.is_empty() {
            tracing::warn!(
                "checkpoint {}: run figures {} were stored as null (not finite); read as 0",
                path.display(),
                repaired.join(", ")
            );
        }
        serde_json::from_value(value).map_err(unreadable)
    }
}

/// Sets every `null` in the figure sections of a run state's JSON to 0; returns their names.
fn repair_figures(value: &mut serde_json::Value) -> Vec<String> {
    let mut repaired = Vec::new();
    for section in FIGURES {
        if let Some(serde_json::Value::Object(fields)) = value.get_mut(section) {
            for (name, figure) in fields.iter_mut().filter(|(_, v)| v.is_null()) {
                *figure = serde_json::Value::from(0);
                repaired.push(format!("{section}.{name}"));
            }
        }
    }
    repaired
}

/// A signal that stops a run with a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopSignal {
    /// SIGINT (Ctrl-C).
    Interrupt,
    /// SIGTERM (`docker stop`, Kubernetes, Slurm's `scancel`).
    Terminate,
}

impl StopSignal {
    pub fn name(self) -> &'static str {
        match self {
            StopSignal::Interrupt => "SIGINT",
            StopSignal::Terminate => "SIGTERM",
        }
    }

    /// 128 + the signal's number, the status shells report for a process a signal ended: 130 for
    /// SIGINT, 143 for SIGTERM. Not 0, so a Kubernetes Job or a script does not take a stopped run
    /// for a finished one.
    pub fn exit_code(self) -> u8 {
        match self {
            StopSignal::Interrupt => 130,
            StopSignal::Terminate => 143,
        }
    }
}

/// SIGTERM and SIGINT, caught from the moment this is made (a signal that arrives while the
/// driver is busy waits here) until the process ends.
#[derive(Debug)]
pub struct StopSignals {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

impl StopSignals {
    /// Installs the handlers (inside a tokio runtime).
    pub fn install() -> Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        let listen = |kind| {
            signal(kind).map_err(|e| Error::Io(format!("cannot install a signal handler: {e}")))
        };
        Ok(StopSignals {
            terminate: listen(SignalKind::terminate())?,
            interrupt: listen(SignalKind::interrupt())?,
        })
    }

    /// The next SIGTERM or SIGINT.
    pub async fn recv(&mut self) -> StopSignal {
        tokio::select! {
            Some(()) = self.terminate.recv() => StopSignal::Terminate,
            Some(()) = self.interrupt.recv() => StopSignal::Interrupt,
            else => std::future::pending().await,
        }
    }
}

/// How a training command ended, errors aside.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Trained to the last epoch: model, summary and pictures written.
    Finished(Summary),
    /// `--resume` of a run that had finished training but whose model (or summary) was missing:
    /// written from the final checkpoint; this is its fingerprint.
    Completed { fingerprint: String },
    /// A signal stopped the run after a checkpoint at `position`; `--resume` continues it.
    Stopped {
        signal: StopSignal,
        position: Position,
    },
}

impl Outcome {
    /// The process's exit status: 0, or 128 + the signal's number for a stopped run.
    pub fn exit_code(&self) -> u8 {
        match self {
            Outcome::Finished(_) | Outcome::Completed { .. } => 0,
            Outcome::Stopped { signal, .. } => signal.exit_code(),
        }
    }
}

/// How the driver's loop ended, errors aside.
enum Ended {
    Finished { heldout: Heldout, train_elbo: f64 },
    Stopped(StopSignal),
}

/// Everything loaded and checked, no socket open yet.
#[derive(Debug)]
pub struct Prepared {
    config: TrainConfig,
    /// TLS for the listener, loaded and checked (`None`: plaintext).
    tls: Option<tonic::transport::ServerTlsConfig>,
    train: Arc<Dataset>,
    heldout: Dataset,
    engine: Arc<Engine>,
    plan: ShardPlan,
    state: StateMachine,
    history: Vec<String>,
    run_time: TimeSplit,
    run_examples: u64,
    /// The global step of the newest checkpoint file when the run resumed from it.
    checkpointed: Option<u64>,
}

impl Prepared {
    /// Whether the resumed checkpoint is at the end of training (nothing left to train).
    pub fn is_finished(&self) -> bool {
        *self.state.phase() == Phase::Finished
    }
}

/// Loads the dataset, builds or resumes the state. Opens no socket. A fresh run refuses an
/// `--out` holding another run unless `--force` (then deletes that run's files).
pub fn prepare(config: TrainConfig) -> Result<Prepared> {
    config.validate()?;
    let tls = load_tls(&config)?;
    outputs::prepare_dir(&config.out, config.resume, config.force)?;
    let source: &DataSource = &config.data;
    let started = Instant::now();
    let data = source.load()?;
    let holdout = config
        .holdout
        .unwrap_or_else(|| source.default_holdout(data.len()));
    let (train, heldout) = data.split_holdout(holdout)?;
    let model = config.model(train.dim());
    train.check_fits(&model.likelihood, model.input_dim)?;
    tracing::info!(
        "data {}: {} training and {} held-out examples of {} values, loaded in {:.2}s",
        source.describe(),
        train.len(),
        heldout.len(),
        train.dim(),
        started.elapsed().as_secs_f64()
    );
    let engine = Arc::new(Engine::new(model, config.samples, config.seed)?);
    let plan = ShardPlan::new(train.len(), config.shards, config.batch, config.seed)?;
    let state_config = StateConfig {
        plan: plan.clone(),
        epochs: config.epochs,
        optimizer: config.optimizer.clone(),
        clip_norm: config.clip_norm,
        min_workers: config.workers,
        worker_timeout: config.worker_timeout(),
        no_worker_timeout: config.no_worker_timeout(),
        checkpoint_every: config.checkpoint_every,
        checkpoint_interval: config.checkpoint_interval(),
        param_len: engine.layout().len(),
        verify_fraction: config.verify,
        // Never sent: workers cannot tell which nodes are verified.
        verify_secret: rand::random(),
    };
    let incarnation = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_millis() as u64);
    let resumed = if config.resume {
        let loaded = outputs::load_checkpoint(&config.out)?;
        if loaded.is_none() {
            tracing::info!(
                "--resume: no checkpoint in {}, starting from scratch",
                config.out.display()
            );
        }
        loaded
    } else {
        None
    };
    let (state, history, run_time, run_examples, checkpointed) = match resumed {
        Some(outputs::LoadedCheckpoint {
            checkpoint: ckpt,
            path: checkpoint_path,
            unreadable,
        }) => {
            let run_state = RunState::from_json(&ckpt.run_config_json, &checkpoint_path)?;
            if run_state.identity != config.identity() {
                return Err(Error::Config(format!(
                    "checkpoint {} was written by a run with other settings ({}) than these \
                     ({}): resume with the same data, model, batch, shards, seed and \
                     optimizer, or use another --out",
                    checkpoint_path.display(),
                    run_state.identity,
                    config.identity()
                )));
            }
            if ckpt.params.len() != engine.layout().len() {
                return Err(Error::Config(format!(
                    "checkpoint {} holds {} parameters, the model has {}",
                    checkpoint_path.display(),
                    ckpt.params.len(),
                    engine.layout().len()
                )));
            }
            if let Some(unreadable) = &unreadable {
                outputs::set_aside(unreadable)?;
            }
            let position = Position {
                epoch: ckpt.epoch,
                step_in_epoch: ckpt.step_in_epoch,
                global_step: ckpt.global_step,
            };
            tracing::info!(
                "resuming from {} at epoch {}, step {} (global step {})",
                checkpoint_path.display(),
                position.epoch + 1,
                position.step_in_epoch,
                position.global_step
            );
            let state = StateMachine::new(
                state_config,
                ckpt.params,
                ckpt.optimizer_state,
                position,
                run_state.epoch_totals,
                incarnation,
            );
            let newest = checkpoint_path == config.out.join(outputs::CHECKPOINT_FILE);
            (
                state,
                ckpt.metrics_history,
                run_state.run_time,
                run_state.run_examples,
                newest.then_some(position.global_step),
            )
        }
        None => {
            let params = match &config.init_from {
                Some(path) => initial_params_from(path, engine.config())?,
                None => engine.init_params(),
            };
            let opt_state = config.optimizer.init_state(params.len());
            let state = StateMachine::new(
                state_config,
                params,
                opt_state,
                Position::default(),
                EpochTotals::default(),
                incarnation,
            );
            (state, Vec::new(), TimeSplit::default(), 0, None)
        }
    };
    outputs::write_config(&config.out, &config)?;
    Ok(Prepared {
        config,
        tls,
        train: Arc::new(train),
        heldout,
        engine,
        plan,
        state,
        history,
        run_time,
        run_examples,
        checkpointed,
    })
}

/// The listener's TLS settings, with a warning when the certificate expires soon.
fn load_tls(config: &TrainConfig) -> Result<Option<tonic::transport::ServerTlsConfig>> {
    let Some(tls) = &config.tls else {
        return Ok(None);
    };
    let files = proto::tls::IdentityFiles {
        cert: tls.cert.clone(),
        key: tls.key.clone(),
    };
    let loaded = proto::tls::server_config(&files, tls.client_ca.as_deref())
        .map_err(|e| Error::Config(format!("TLS: {e}")))?;
    if let Some(left) = loaded.expires_in {
        let days = left.as_secs() / 86_400;
        if left < proto::tls::EXPIRY_WARNING {
            tracing::warn!(
                "the TLS certificate {} expires in {days} day(s): renew it and restart with \
                 --resume",
                tls.cert.display()
            );
        }
        tracing::info!(
            "TLS with {} (expires in {days} days){}",
            tls.cert.display(),
            if tls.client_ca.is_some() {
                "; workers must present a certificate signed by --tls-ca"
            } else {
                ""
            }
        );
    }
    Ok(Some(loaded.config))
}

/// The parameters of a saved model, checked against the configured architecture.
fn initial_params_from(
    path: &std::path::Path,
    model: &common::model::ModelConfig,
) -> Result<Vec<f32>> {
    let loaded = common::formats::load_model(path)?;
    if loaded.config != *model {
        return Err(Error::Config(format!(
            "--init-from {}: the saved model is {:?}, the run's model is {:?}; set --hidden, \
             --latent and --likelihood to match",
            path.display(),
            loaded.config,
            model
        )));
    }
    tracing::info!("starting from the parameters in {}", path.display());
    Ok(loaded.params)
}

/// Prepares, binds `--listen`, and trains to the end or until SIGTERM or SIGINT (caught from
/// the end of the preparation on). A resumed run that had already finished training only writes
/// the outputs a crash left missing.
pub async fn run(config: TrainConfig) -> Result<Outcome> {
    let listen = config.listen.clone();
    let prepared = tokio::task::spawn_blocking(move || prepare(config))
        .await
        .map_err(|e| Error::Io(format!("preparation panicked: {e}")))??;
    if prepared.is_finished() {
        return complete_finished(prepared).await;
    }
    let signals = StopSignals::install()?;
    let listener = TcpListener::bind(&listen).await.map_err(|e| {
        Error::Io(format!(
            "cannot listen on {listen}: {e}; choose another address with --listen (port 0 picks \
             a free one)"
        ))
    })?;
    serve(prepared, listener, signals).await
}

/// Serves workers on `listener` and drives the run to its end, or until a signal from `signals`
/// stops it with a checkpoint of the last applied step.
pub async fn serve(
    prepared: Prepared,
    listener: TcpListener,
    mut signals: StopSignals,
) -> Result<Outcome> {
    let Prepared {
        config,
        tls,
        train,
        heldout,
        engine,
        plan,
        state,
        history,
        mut run_time,
        mut run_examples,
        checkpointed,
    } = prepared;
    let addr: SocketAddr = listener
        .local_addr()
        .map_err(|e| Error::Io(format!("listener address: {e}")))?;
    // Tests and scripts read this line to find an ephemeral port.
    println!("coordinator listening on {addr}");
    tracing::info!(
        "waiting for {} worker(s) on {addr}; {} shards, batch {}, {} steps per epoch",
        config.workers,
        plan.shards(),
        plan.batch(),
        plan.steps_per_epoch()
    );
    let run_spec = proto::messages::RunSpec {
        model: engine.config().clone(),
        samples: config.samples,
        seed: config.seed,
        shards: plan.shards(),
        run_id: config.run_id(),
    };
    let prometheus = Metrics::new();
    {
        let position = state.position();
        let last = history
            .last()
            .and_then(|line| serde_json::from_str::<EpochMetrics>(line).ok());
        prometheus.start_at(
            position.global_step,
            position.epoch,
            run_examples,
            last.as_ref(),
        );
    }
    let metrics_server = match &config.metrics_addr {
        Some(metrics_addr) => {
            let listener = crate::metrics::bind(metrics_addr).await?;
            let bound = listener
                .local_addr()
                .map_err(|e| Error::Io(format!("metrics listener address: {e}")))?;
            // Like the line above: tests and scripts read it to find an ephemeral port.
            println!("metrics listening on {bound}");
            tracing::info!("Prometheus metrics at http://{bound}/metrics");
            Some(tokio::spawn(crate::metrics::serve(
                listener,
                prometheus.clone(),
            )))
        }
        None => None,
    };
    let sessions = Arc::new(Sessions::default());
    let shared = Shared::new(
        state,
        Arc::clone(&train),
        plan.clone(),
        run_spec,
        Arc::clone(&sessions),
        config.max_workers,
        crate::transport::Transport::new(shared_dir(&config))
            .copying_gradients(config.verify > 0.0),
        prometheus.clone(),
    );
    ready_before_training(&shared, engine.layout().len(), config.workers, config.local).await;
    let token = config
        .token
        .as_deref()
        .map(Token::new)
        .transpose()
        .map_err(Error::Config)?;
    // A result carries at most one inline gradient per shard (a worker holding every node).
    let submit_bytes = plan.shards() * (engine.layout().len() * 4 + 1024) + SMALL_REQUEST_BYTES;
    let gate = Arc::new(Gate::new(token, sessions, submit_bytes, prometheus.clone()));
    let limits = ConnectionLimits {
        max_connections: config.max_connections,
        idle_timeout: config.idle_timeout(),
    };
    // Pings keep live but quiet connections (a worker deep in a long step) under the idle timeout.
    let ping_every = limits.idle_timeout / 3;
    let mut builder = tonic::transport::Server::builder()
        .initial_stream_window_size(Some(proto::STREAM_WINDOW_BYTES))
        .initial_connection_window_size(Some(proto::CONNECTION_WINDOW_BYTES))
        .max_frame_size(Some(proto::MAX_FRAME_BYTES))
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
        .http2_keepalive_interval(Some(ping_every))
        .http2_keepalive_timeout(Some(ping_every));
    if let Some(tls) = tls {
        builder = builder
            .tls_config(tls)
            .map_err(|e| Error::Config(format!("TLS: {e}")))?;
    }
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = builder
        .layer(GateLayer(Arc::clone(&gate)))
        .add_service(TrainerService::new(Arc::clone(&shared)).into_server(gate.max_request_bytes()))
        .serve_with_incoming_shutdown(listener::incoming(listener, limits), async {
            let _ = stop_rx.await;
        });
    let server = tokio::spawn(server);

    let mut children = if config.local {
        let threads = config
            .worker_threads
            .unwrap_or_else(|| crate::local::default_threads(config.workers));
        crate::local::spawn_workers(config.workers, addr, threads, config.token.as_deref())?
    } else {
        Vec::new()
    };

    let started = Instant::now();
    let mut driver = Driver {
        config: &config,
        shared: &shared,
        engine: Arc::clone(&engine),
        heldout: Arc::new(heldout),
        metrics: MetricsLog::create(&config.out, &history)?,
        history,
        progress: Progress::new(plan.steps_per_epoch() as u64, config.epochs),
        last_heldout: None,
        last_train_elbo: f64::NAN,
        prometheus,
        throughput: Throughput::default(),
        checkpointed,
        checkpoints: CheckpointWriter::default(),
    };
    let ended = driver
        .drive(&mut signals, &mut run_time, &mut run_examples)
        .await;
    let (params, position) = {
        let state = shared.state();
        (state.params().to_vec(), state.position())
    };
    // A finished run's model and summary come first, before the wait for workers and the
    // pictures: the run is complete once they are on disk.
    let outcome = match ended {
        Ok(Ended::Finished {
            heldout,
            train_elbo,
        }) => write_model(&config, &engine, &params).and_then(|fingerprint| {
            let summary = final_summary(
                &config,
                position,
                train_elbo,
                &heldout,
                run_time,
                run_examples,
                fingerprint,
                started.elapsed().as_secs_f64(),
            );
            outputs::write_summary(&config.out, &summary)?;
            Ok(Outcome::Finished(summary))
        }),
        Ok(Ended::Stopped(signal)) => Ok(Outcome::Stopped { signal, position }),
        Err(e) => Err(e),
    };
    let stopped = matches!(outcome, Ok(Outcome::Stopped { .. }));
    if stopped {
        // Remote workers are left to retry: a coordinator restarted with --resume continues
        // with them. Local ones are this process's children, stopped with it.
        for child in &mut children {
            let _ = child.start_kill();
        }
    } else {
        // Let workers hear `Done` before the server goes away; a signal cuts the wait short.
        tokio::select! {
            _ = tokio::time::sleep(SHUTDOWN_GRACE) => {}
            signal = signals.recv() => tracing::info!(
                "{} received: not waiting for the workers to hear that training ended",
                signal.name()
            ),
        }
    }
    let _ = stop_tx.send(());
    shared.stop_mailboxes();
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, server).await;
    if let Some(metrics_server) = metrics_server {
        metrics_server.abort();
    }
    for child in &mut children {
        let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
        let _ = child.start_kill();
    }
    driver.progress.finish();
    let summary = match outcome? {
        Outcome::Finished(summary) => summary,
        Outcome::Stopped { signal, position } => {
            tracing::warn!(
                "stopped by {} at epoch {}, step {} (global step {}); checkpoint in {}: rerun the \
                 same command with --resume to continue",
                signal.name(),
                position.epoch + 1,
                position.step_in_epoch,
                position.global_step,
                config.out.join(outputs::CHECKPOINT_FILE).display()
            );
            return Ok(Outcome::Stopped { signal, position });
        }
        completed @ Outcome::Completed { .. } => return Ok(completed),
    };
    if let Some(paths) = draw_pictures(&config, &engine, &driver.heldout, params).await {
        let paths: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
        tracing::info!("pictures: {}", paths.join(", "));
    }
    tracing::info!(
        "done: held-out ELBO {:.3} nats{}, {:.0} samples/s (compute {:.1}s, communication {:.1}s, \
         update {:.1}s of {:.1}s in steps)",
        summary.heldout_elbo,
        summary.heldout_iw_bound.map_or(String::new(), |b| format!(
            ", IW bound (k={}) {b:.3}",
            config.iw_samples
        )),
        summary.samples_per_s,
        run_time.compute_s,
        run_time.communicate_s,
        run_time.update_s,
        run_time.step_s
    );
    println!("fingerprint {}", summary.fingerprint);
    Ok(Outcome::Finished(summary))
}

/// Writes `model.safetensors` with `params`; returns their fingerprint.
fn write_model(config: &TrainConfig, engine: &Engine, params: &[f32]) -> Result<String> {
    let fingerprint = fingerprint(params);
    let mut extra = BTreeMap::new();
    extra.insert("fingerprint".to_string(), fingerprint.clone());
    extra.insert("seed".to_string(), config.seed.to_string());
    extra.insert("epochs".to_string(), config.epochs.to_string());
    extra.insert("data".to_string(), config.data.to_string());
    common::formats::save_model(
        &config.out.join(outputs::MODEL_FILE),
        engine.config(),
        params,
        &extra,
    )?;
    Ok(fingerprint)
}

/// `summary.json` of a run that ended at `position` with these figures.
#[allow(clippy::too_many_arguments)]
fn final_summary(
    config: &TrainConfig,
    position: Position,
    train_elbo: f64,
    heldout: &Heldout,
    run_time: TimeSplit,
    run_examples: u64,
    fingerprint: String,
    wall_s: f64,
) -> Summary {
    Summary {
        epochs: position.epoch,
        global_steps: position.global_step,
        train_elbo,
        heldout_elbo: heldout.elbo,
        heldout_recon: heldout.recon,
        heldout_kl: heldout.kl,
        heldout_iw_bound: heldout.iw_bound,
        iw_samples: config.iw_samples,
        samples_per_s: run_examples as f64 / run_time.step_s.max(1e-9),
        time: run_time,
        fingerprint,
        wall_s,
    }
}

/// `--resume` of a run whose checkpoint is at the end of training. The final checkpoint is
/// written before the model, so a crash between them leaves a finished run without its model:
/// this writes the model (and the summary and pictures) from the checkpoint. With every output
/// present there is nothing to do, and the run is refused as before.
async fn complete_finished(prepared: Prepared) -> Result<Outcome> {
    let started = Instant::now();
    let Prepared {
        config,
        engine,
        heldout,
        state,
        history,
        run_time,
        run_examples,
        ..
    } = prepared;
    let params = state.params().to_vec();
    let position = state.position();
    let expected = fingerprint(&params);
    let model_path = config.out.join(outputs::MODEL_FILE);
    let model_problem = if !model_path.exists() {
        Some("is missing".to_string())
    } else {
        match common::formats::load_model(&model_path) {
            Ok(model) if fingerprint(&model.params) == expected => None,
            Ok(_) => Some("holds other parameters than the final checkpoint".to_string()),
            Err(e) => Some(format!("cannot be read ({e})")),
        }
    };
    let summary_missing = !config.out.join(outputs::SUMMARY_FILE).is_file();
    if model_problem.is_none() && !summary_missing {
        return Err(Error::Config(format!(
            "the run in {} already finished all {} epochs, and its model and summary are \
             written; raise --epochs to train longer",
            config.out.display(),
            position.epoch
        )));
    }
    if let Some(problem) = &model_problem {
        write_model(&config, &engine, &params)?;
        tracing::warn!(
            "the run in {} had finished training, but {} {problem}: wrote it from the final \
             checkpoint",
            config.out.display(),
            model_path.display()
        );
    }
    if summary_missing {
        let last = history
            .last()
            .and_then(|line| serde_json::from_str::<EpochMetrics>(line).ok());
        match last {
            Some(last) => {
                let heldout = Heldout {
                    elbo: last.heldout_elbo,
                    recon: last.heldout_recon,
                    kl: last.heldout_kl,
                    iw_bound: last.heldout_iw_bound,
                };
                let summary = final_summary(
                    &config,
                    position,
                    last.train_elbo,
                    &heldout,
                    run_time,
                    run_examples,
                    expected.clone(),
                    started.elapsed().as_secs_f64(),
                );
                outputs::write_summary(&config.out, &summary)?;
                tracing::warn!(
                    "wrote the missing {}",
                    config.out.join(outputs::SUMMARY_FILE).display()
                );
            }
            None => tracing::warn!(
                "cannot write {}: the checkpoint holds no readable metrics line",
                outputs::SUMMARY_FILE
            ),
        }
    }
    if model_problem.is_some()
        && let Some(paths) = draw_pictures(&config, &engine, &Arc::new(heldout), params).await
    {
        let paths: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
        tracing::info!("pictures: {}", paths.join(", "));
    }
    println!("fingerprint {expected}");
    Ok(Outcome::Completed {
        fingerprint: expected,
    })
}

/// Makes, before the first step, what the first steps would otherwise make inside themselves
/// (docs/scaling.md §24): resident buffers for gradients sent inline (none for a `--local` run that
/// reads them in place), the optimizer's thread pool, and for `--local` runs, whose workers surely
/// share this host, the parameter files and every shard's file (which their first tasks would
/// otherwise have written, in steps 0-3). Training's wall time is the same; the steps' times then
/// measure training alone. All of it is optional: a failure is logged and the first steps make what
/// is missing, as without this.
async fn ready_before_training(
    shared: &Arc<Shared>,
    param_len: usize,
    workers: usize,
    local: bool,
) {
    let shared = Arc::clone(shared);
    let started = Instant::now();
    let readied = tokio::task::spawn_blocking(move || {
        shared
            .transport()
            .reserve_gradient_buffers(param_len, workers, local);
        // Starts the pool the optimizer runs on, which would otherwise start in step 0's update.
        rayon::broadcast(|_| ());
        if local {
            shared.transport().prepare_parameter_files(param_len);
            let shards = shared.plan().shards() as u32;
            shared
                .transport()
                .write_shard_files((0..shards).map(|s| (s, shared.shard_values(s))));
        }
    })
    .await;
    match readied {
        Ok(()) => tracing::debug!(
            "first steps readied in {:.1} ms",
            started.elapsed().as_secs_f64() * 1e3
        ),
        Err(e) => tracing::warn!("readying the first steps failed ({e}); they do it themselves"),
    }
}

/// The shared-memory directory offered to workers on this host, unless `--transport tcp` or the
/// host has no usable memory-backed directory (then every worker gets tensors inline).
fn shared_dir(config: &TrainConfig) -> Option<proto::shared_memory::SharedDir> {
    use rand::RngExt;
    if config.transport == crate::config::Transport::Tcp {
        return None;
    }
    let base = std::path::Path::new(proto::shared_memory::DEFAULT_BASE);
    if !base.is_dir() {
        tracing::info!(
            "no {} here: tensors go inline to every worker",
            base.display()
        );
        return None;
    }
    let mut rng = rand::rng();
    let probe: [u8; 16] = rng.random();
    let tag = hex::encode(rng.random::<[u8; 4]>());
    match proto::shared_memory::SharedDir::create(base, &tag, &probe) {
        Ok(dir) => {
            tracing::debug!(
                "shared memory for workers on this host: {}",
                dir.path().display()
            );
            Some(dir)
        }
        Err(e) => {
            tracing::warn!(
                "cannot create a shared-memory directory in {}: {e}; tensors go inline to every \
                 worker",
                base.display()
            );
            None
        }
    }
}

/// Writes the run's pictures into `--out` off the async threads. Pictures are a convenience:
/// a failure is logged and never fails a trained run.
async fn draw_pictures(
    config: &TrainConfig,
    engine: &Arc<Engine>,
    heldout: &Arc<Dataset>,
    params: Vec<f32>,
) -> Option<Vec<std::path::PathBuf>> {
    let (engine, heldout) = (Arc::clone(engine), Arc::clone(heldout));
    let (out, seed) = (config.out.clone(), config.seed);
    let drawn = tokio::task::spawn_blocking(move || {
        crate::tools::write_run_images(&out, &engine, &params, &heldout, seed)
    })
    .await;
    match drawn {
        Ok(Ok(paths)) => Some(paths),
        Ok(Err(e)) => {
            tracing::warn!("could not draw the run's pictures: {e}");
            None
        }
        Err(e) => {
            tracing::warn!("drawing the run's pictures panicked: {e}");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_finite_figures_never_make_a_checkpoint_unreadable() {
        let mut epoch_totals = EpochTotals {
            steps: 3,
            compute_seconds: f64::INFINITY,
            update_seconds: 0.25,
            ..EpochTotals::default()
        };
        epoch_totals.stats.examples = 192;
        epoch_totals.stats.elbo = f64::NAN;
        epoch_totals.stats.kl = 12.5;
        let state = RunState {
            identity: serde_json::json!({ "holdout": null, "seed": 0 }),
            epoch_totals,
            run_time: TimeSplit {
                step_s: f64::NEG_INFINITY,
                compute_s: 1.5,
                ..TimeSplit::default()
            },
            run_examples: 1000,
        };
        let path = std::path::Path::new("checkpoint.safetensors");
        let back = RunState::from_json(&state.to_json(), path).unwrap();
        let mut repaired = state.clone();
        repaired.epoch_totals.compute_seconds = 0.0;
        repaired.epoch_totals.stats.elbo = 0.0;
        repaired.run_time.step_s = 0.0;
        assert_eq!(
            back, repaired,
            "non-finite figures become 0, the rest is kept"
        );
        assert!(back.identity["holdout"].is_null(), "identity nulls stay");

        // As an earlier version wrote them: `null` figures read as 0.
        let old = serde_json::to_string(&state).unwrap();
        assert!(old.contains("\"compute_seconds\":null"), "{old}");
        assert_eq!(RunState::from_json(&old, path).unwrap(), repaired);
        // Anything else unreadable is still refused, naming the file.
        let e = RunState::from_json("{\"identity\": 1}", path)
            .unwrap_err()
            .to_string();
        assert!(e.contains("checkpoint.safetensors"), "{e}");
    }

    #[test]
    fn a_stopped_run_exits_with_128_plus_the_signal() {
        let stopped = |signal| Outcome::Stopped {
            signal,
            position: Position::default(),
        };
        assert_eq!(stopped(StopSignal::Interrupt).exit_code(), 130);
        assert_eq!(stopped(StopSignal::Terminate).exit_code(), 143);
        let done = Outcome::Completed {
            fingerprint: String::new(),
        };
        assert_eq!(done.exit_code(), 0);
    }
}

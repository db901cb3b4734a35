//! The driver: the loop that runs a training run's steps once it is served. It reacts to the
//! state machine's outputs (updates to apply, epochs to evaluate, checkpoints to write), to time
//! passing, and to stop signals.

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::data::Dataset;
use common::formats::Checkpoint;
use common::train::{Engine, ReductionTree, ShardBatch};

use super::{Ended, RunState, StopSignal, StopSignals, draw_pictures};
use crate::checkpoint_writer::CheckpointWriter;
use crate::config::TrainConfig;
use crate::error::{Error, Result};
use crate::metrics::{Metrics, Throughput};
use crate::outputs::{self, EpochMetrics, Heldout, MetricsLog, TimeSplit};
use crate::progress::Progress;
use crate::service::Shared;
use crate::state::{EpochTotals, Output, Phase};
use crate::update;

/// How often the driver checks for silent workers. A fraction of the default worker timeout, so
/// detection takes at most timeout + this.
const TICK: Duration = Duration::from_millis(200);

pub(super) struct Driver<'a> {
    pub(super) config: &'a TrainConfig,
    pub(super) shared: &'a Arc<Shared>,
    pub(super) engine: Arc<Engine>,
    pub(super) heldout: Arc<Dataset>,
    pub(super) metrics: MetricsLog,
    pub(super) history: Vec<String>,
    pub(super) progress: Progress,
    pub(super) last_heldout: Option<Heldout>,
    pub(super) last_train_elbo: f64,
    /// What `--metrics-addr` serves (updated whether or not it is served).
    pub(super) prometheus: Metrics,
    pub(super) throughput: Throughput,
    /// The global step of the newest checkpoint file, when this process wrote it or resumed
    /// from it: a stop at that step writes no copy (which would rotate the previous one away).
    pub(super) checkpointed: Option<u64>,
    /// The periodic checkpoint being written while training goes on.
    pub(super) checkpoints: CheckpointWriter,
}

/// Whether a checkpoint must be on disk before the run goes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Durable {
    /// Written while training goes on (periodic and end-of-epoch checkpoints): the next
    /// checkpoint, or the end of the run, waits for it.
    Later,
    /// On disk before this returns (a stop or a failure ends the run with it).
    Now,
}

impl Driver<'_> {
    /// Runs until the state machine finishes (final held-out figures and train ELBO), a signal
    /// stops the run (after a checkpoint of the last applied step), or the run fails (Err, after
    /// a checkpoint of the last applied step).
    ///
    /// On a signal no further update is applied: a step whose results are all in is left to the
    /// resumed run, and the checkpoint holds the parameters, optimizer state and position after
    /// the last applied update. An epoch that has just ended is evaluated and recorded first (its
    /// position is already the next epoch's), and a run that has just finished finishes.
    pub(super) async fn drive(
        &mut self,
        signals: &mut StopSignals,
        run_time: &mut TimeSplit,
        run_examples: &mut u64,
    ) -> Result<Ended> {
        let ended = self.drive_steps(signals, run_time, run_examples).await;
        // Whatever ended it, no mailbox thread trains on while the run winds down.
        self.shared.state().hold_updates_for_stop();
        // However the run ended, a checkpoint still being written is waited for: its error fails
        // a run that would otherwise have succeeded.
        first_error(ended, self.finish_checkpoint().await)
    }

    async fn drive_steps(
        &mut self,
        signals: &mut StopSignals,
        run_time: &mut TimeSplit,
        run_examples: &mut u64,
    ) -> Result<Ended> {
        let mut changed = self.shared.subscribe();
        let mut ticker = tokio::time::interval(TICK);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        if *self.shared.state().phase() == Phase::Finished {
            return Err(Error::Config(format!(
                "the run in {} already finished all {} epochs; raise --epochs to train longer",
                self.config.out.display(),
                self.config.epochs
            )));
        }
        let mut stop: Option<StopSignal> = None;
        loop {
            tokio::select! {
                _ = changed.changed() => {}
                _ = ticker.tick() => {}
                signal = signals.recv(), if stop.is_none() => {
                    tracing::warn!(
                        "{} received: stopping with a checkpoint of the last applied step",
                        signal.name()
                    );
                    stop = Some(signal);
                    self.shared.state().hold_updates_for_stop();
                }
            }
            // An update a mailbox thread ran panicked: the parameters were in it.
            if let Some(panic) = self.shared.take_update_panic() {
                return Err(update_panicked(&panic));
            }
            let outputs = {
                let mut state = self.shared.state();
                state.tick(Instant::now());
                state.drain_outputs()
            };
            if !outputs.is_empty() {
                self.shared.notify();
            }
            for output in outputs {
                match output {
                    Output::WorkerJoined { worker, name } => {
                        self.prometheus.worker_joined();
                        tracing::info!("worker {worker} joined: {name}");
                    }
                    Output::WorkerLost {
                        worker,
                        name,
                        reason,
                        moved,
                    } => {
                        self.shared.forget_worker(worker);
                        self.prometheus.worker_lost(worker);
                        tracing::warn!(
                            "worker {worker} ({name}) lost: {reason}; {} unfinished node(s) of \
                             this step moved to other workers",
                            moved.len()
                        );
                    }
                    Output::ResultRejected {
                        worker,
                        name,
                        step,
                        node,
                        reason,
                    } => {
                        self.prometheus.result_rejected();
                        tracing::warn!(
                            "rejected the result of worker {worker} ({name}) for step {step}, \
                             shards {}..{}: {reason}; the step will use a recomputed one",
                            node.lo,
                            node.hi
                        );
                    }
                    Output::NodeBackedUp {
                        slow,
                        name,
                        node,
                        held_seconds,
                        backup,
                    } => {
                        self.prometheus.node_backed_up();
                        tracing::warn!(
                            "worker {slow} ({name}) has held shards {}..{} for {held_seconds:.1}s \
                             while the step's other work finished: worker {backup} computes them \
                             too, and the first result is used",
                            node.lo,
                            node.hi
                        );
                    }
                    Output::ComputeNode {
                        global_step,
                        epoch,
                        work,
                    } => self.compute_here(global_step, epoch, work),
                    Output::NodeVerified { step, node, agreed } => {
                        tracing::debug!(
                            "step {step}: shards {}..{} verified ({})",
                            node.lo,
                            node.hi,
                            if agreed {
                                "two workers agree"
                            } else {
                                "computed here"
                            }
                        );
                    }
                    Output::WorkerQuarantined {
                        worker,
                        name,
                        reason,
                    } => {
                        self.prometheus.worker_quarantined();
                        tracing::warn!(
                            "worker {worker} ({name}) quarantined: {reason}; its unfinished \
                             work, if any, moves to the others, and it may not register again \
                             under that name"
                        );
                    }
                    // Stopping: this step is left to the resumed run.
                    Output::StepReady { .. } if stop.is_some() => {}
                    Output::StepReady { global_step } => self.update(global_step).await?,
                    Output::StepApplied {
                        position,
                        examples,
                        elbo,
                        seconds,
                    } => {
                        let rate = self.throughput.add(Instant::now(), examples, seconds);
                        self.prometheus.step_applied(examples, elbo, seconds, rate);
                        self.progress.step(position, elbo, self.config.batch as u64);
                    }
                    Output::EpochEnded { epoch, totals } => {
                        self.end_epoch(epoch, totals, run_time, run_examples)
                            .await?;
                    }
                    // Stopping: the stop's own checkpoint follows.
                    Output::CheckpointDue if stop.is_some() => {}
                    Output::CheckpointDue => {
                        self.checkpoint(*run_time, *run_examples, Durable::Later)
                            .await?
                    }
                    Output::Finished => {
                        let heldout = self.last_heldout.ok_or_else(|| {
                            Error::Training("finished without an evaluation".into())
                        })?;
                        return Ok(Ended::Finished {
                            heldout,
                            train_elbo: self.last_train_elbo,
                        });
                    }
                    Output::Failed(reason) => {
                        // The failure's reason is the error, whether or not its checkpoint
                        // could be written.
                        let saved = self.last_checkpoint(*run_time, *run_examples).await;
                        return Err(Error::Training(match saved {
                            Ok(()) => format!(
                                "{reason} (checkpoint in {})",
                                self.config.out.join(outputs::CHECKPOINT_FILE).display()
                            ),
                            Err(e) => format!("{reason} (no checkpoint of it: {e})"),
                        }));
                    }
                }
            }
            // A background write that failed fails the run now (at the driver's next wake-up,
            // 200 ms at most), not at the next checkpoint, which may be an epoch away: with the
            // snapshot in hand written first. A stop reports it below.
            if stop.is_none()
                && self.checkpoints.write_done()
                && let Err(e) = self.finish_checkpoint().await
            {
                if let Err(also) = self
                    .checkpoint(*run_time, *run_examples, Durable::Now)
                    .await
                {
                    tracing::error!("{also}");
                }
                return Err(e);
            }
            if let Some(signal) = stop {
                // Evaluating: an ended epoch's outputs are still to be drained; Finished and
                // Failed: so are those that end the run.
                // An update a mailbox thread took before the stop: its step is applied first.
                let settled = {
                    let state = self.shared.state();
                    !state.update_in_flight()
                        && !matches!(
                            *state.phase(),
                            Phase::Evaluating | Phase::Finished | Phase::Failed(_)
                        )
                };
                if settled {
                    // Unless the newest is of this very step (an epoch's end, or nothing
                    // trained since the resume).
                    let step = self.shared.state().position().global_step;
                    self.finish_earlier_checkpoint().await;
                    if self.checkpointed != Some(step) {
                        self.last_checkpoint(*run_time, *run_examples).await?;
                    }
                    return Ok(Ended::Stopped(signal));
                }
            }
        }
    }

    /// Computes a tree node here, off the async threads, and hands it to the state machine: the
    /// trusted copy that settles a verification (the parameters are the step's: a step with a
    /// node outstanding cannot complete).
    fn compute_here(&self, global_step: u64, epoch: u64, work: proto::messages::NodeWork) {
        let shared = Arc::clone(self.shared);
        let engine = Arc::clone(&self.engine);
        let train = Arc::clone(self.shared.train());
        // The step completed meanwhile (the slow worker's own result came in, through a mailbox
        // whose thread may be running the update now): nothing to compute.
        let Some(params) = self
            .shared
            .state()
            .params_of_step(global_step)
            .map(<[f32]>::to_vec)
        else {
            return;
        };
        tokio::task::spawn_blocking(move || {
            let tree = ReductionTree::new(shared.plan().shards());
            let pixels = train.pixels();
            let rows: Vec<ndarray::Array2<f32>> = work
                .shards
                .iter()
                .map(|s| {
                    let ids: Vec<usize> = s.examples.iter().map(|&e| e as usize).collect();
                    pixels.select(ndarray::Axis(0), &ids)
                })
                .collect();
            let batches: Vec<ShardBatch<'_>> = work
                .shards
                .iter()
                .zip(&rows)
                .map(|(s, x)| ShardBatch {
                    shard: s.shard,
                    x: x.view(),
                    examples: &s.examples,
                })
                .collect();
            match engine.node_gradient(&params, epoch, &tree, work.node, &batches) {
                Ok(sum) => {
                    shared
                        .state()
                        .accept_own_computation(global_step, work.node, sum);
                }
                // The step cannot complete without this node: stop rather than wait forever
                // (unless it completed meanwhile, from a late result).
                Err(e) => {
                    let mut state = shared.state();
                    if state.params_of_step(global_step).is_some() {
                        state.stop(format!(
                            "step {global_step}: the coordinator cannot compute shards {}..{} \
                             itself: {e}",
                            work.node.lo, work.node.hi
                        ));
                    }
                }
            }
            shared.notify();
        });
    }

    /// Applies a ready step's update on a blocking thread, so heartbeats and long polls go on
    /// meanwhile (`crate::update`). A co-located worker's mailbox thread may have taken it first.
    async fn update(&mut self, global_step: u64) -> Result<()> {
        let Some(job) = self.shared.state().take_update_of(global_step) else {
            return Ok(());
        };
        let shared = Arc::clone(self.shared);
        let started = Instant::now();
        tracing::trace!("step {}: update starts", job.global_step);
        tokio::task::spawn_blocking(move || update::apply(&shared, job, started))
            .await
            .map_err(|e| update_panicked(&e))
    }

    async fn end_epoch(
        &mut self,
        epoch: u64,
        totals: EpochTotals,
        run_time: &mut TimeSplit,
        run_examples: &mut u64,
    ) -> Result<()> {
        let (params, position, workers) = {
            let state = self.shared.state();
            (
                state.params().to_vec(),
                state.position(),
                state.live_workers(),
            )
        };
        let last_epoch = epoch + 1 >= self.config.epochs;
        let iw = if last_epoch {
            self.config.iw_samples
        } else {
            0
        };
        let engine = Arc::clone(&self.engine);
        let heldout = Arc::clone(&self.heldout);
        let eval_started = Instant::now();
        let report =
            tokio::task::spawn_blocking(move || engine.evaluate(&params, heldout.pixels(), iw))
                .await
                .map_err(|e| Error::Io(format!("evaluation panicked: {e}")))??;
        let heldout = Heldout {
            elbo: report.elbo,
            recon: report.recon,
            kl: report.kl,
            iw_bound: report.iw_bound,
        };
        let metrics = EpochMetrics::new(epoch, position.global_step, &totals, &heldout, workers);
        run_time.add(&metrics.time);
        *run_examples += totals.stats.examples;
        self.last_heldout = Some(heldout);
        self.last_train_elbo = metrics.train_elbo;
        let line = self.metrics.append(&metrics)?;
        self.history.push(line);
        self.prometheus.epoch_ended(&metrics);
        if self.config.pictures_every_epoch && !last_epoch {
            let params = self.shared.state().params().to_vec();
            draw_pictures(self.config, &self.engine, &self.heldout, params).await;
        }
        self.progress
            .epoch(&metrics, eval_started.elapsed().as_secs_f64());
        self.shared.state().finish_evaluation(Instant::now());
        self.shared.notify();
        self.checkpoint(*run_time, *run_examples, Durable::Later)
            .await
    }

    /// Snapshots the parameters, optimizer state and position, and writes them as a checkpoint:
    /// in the background for [`Durable::Later`] (after the previous write has finished).
    async fn checkpoint(
        &mut self,
        run_time: TimeSplit,
        run_examples: u64,
        durable: Durable,
    ) -> Result<()> {
        let checkpoint = loop {
            if let Some(checkpoint) = self.snapshot(run_time, run_examples) {
                break checkpoint;
            }
            // An update a mailbox thread took holds the parameters (a failure while it ran, or
            // a background write that failed; periodic and epoch-end checkpoints hold updates
            // back instead, and a stop waits for it before its checkpoint).
            if let Some(panic) = self.shared.take_update_panic() {
                return Err(update_panicked(&panic));
            }
            tokio::time::sleep(Duration::from_micros(100)).await;
        };
        // A write that failed in the background fails the run, but only after this snapshot is
        // on disk: the steps since that write are not lost with it.
        let earlier = self
            .checkpoints
            .start(self.config.out.clone(), checkpoint)
            .await
            .map(|written| self.note_written(written));
        if durable == Durable::Later && earlier.is_ok() {
            return Ok(());
        }
        first_error(earlier, self.finish_checkpoint().await)
    }

    /// The state as a checkpoint, taken under the state lock; `None` while an update has the
    /// parameters out. Lets other threads take updates again.
    fn snapshot(&self, run_time: TimeSplit, run_examples: u64) -> Option<Checkpoint> {
        let mut state = self.shared.state();
        if state.update_in_flight() {
            return None;
        }
        let spare = self.checkpoints.take_spare();
        state.snapshot_taken();
        let position = state.position();
        let run_state = RunState {
            identity: self.config.identity(),
            epoch_totals: state.totals(),
            run_time,
            run_examples,
        };
        // Into the last checkpoint's buffers when its write has handed them back.
        let (params, optimizer_state) = match spare {
            Some(Checkpoint {
                mut params,
                mut optimizer_state,
                ..
            }) => {
                params.resize(state.params().len(), 0.0);
                common::kernels::copy_values(&mut params, state.params());
                optimizer_state.clone_from(state.optimizer_state());
                (params, optimizer_state)
            }
            None => (state.params().to_vec(), state.optimizer_state().clone()),
        };
        Some(Checkpoint {
            params,
            optimizer: self.config.optimizer.clone(),
            optimizer_state,
            global_step: position.global_step,
            epoch: position.epoch,
            step_in_epoch: position.step_in_epoch,
            run_config_json: run_state.to_json(),
            metrics_history: self.history.clone(),
        })
    }

    /// The checkpoint a stop or a failure ends the run with, on disk when this returns. An
    /// earlier write that failed does not keep it from being written (the error is logged).
    async fn last_checkpoint(&mut self, run_time: TimeSplit, run_examples: u64) -> Result<()> {
        self.finish_earlier_checkpoint().await;
        self.checkpoint(run_time, run_examples, Durable::Now).await
    }

    /// Waits for the checkpoint being written, if any; its error is logged, not returned.
    async fn finish_earlier_checkpoint(&mut self) {
        if let Err(e) = self.finish_checkpoint().await {
            tracing::warn!("the previous checkpoint was not written: {e}");
        }
    }

    /// Waits for the checkpoint being written, if any.
    async fn finish_checkpoint(&mut self) -> Result<()> {
        let written = self.checkpoints.finish().await?;
        self.note_written(written);
        Ok(())
    }

    fn note_written(&mut self, written: Option<u64>) {
        if let Some(global_step) = written {
            self.checkpointed = Some(global_step);
            self.prometheus.checkpoint_written();
        }
    }
}

/// The run's error when an update panicked (on the driver's blocking thread or a mailbox
/// thread): the parameters were in it, so no checkpoint of them can follow; the last one written
/// stands.
fn update_panicked(cause: &dyn std::fmt::Display) -> Error {
    Error::Io(format!(
        "the update (optimizer step or hand-back) panicked: {cause}"
    ))
}

/// `first`, unless it is Ok and `then` is not; a second error is logged.
fn first_error<T>(first: Result<T>, then: Result<()>) -> Result<T> {
    match (first, then) {
        (Ok(value), then) => then.map(|()| value),
        (Err(e), Ok(())) => Err(e),
        (Err(e), Err(also)) => {
            tracing::error!("{also}");
            Err(e)
        }
    }
}

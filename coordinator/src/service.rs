//! The gRPC service: each handler validates and converts its request, makes one call on the
//! state machine, and maps the result back. No training logic lives here.

use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::data::Dataset;
use common::train::ShardPlan;
use proto::messages::{
    Attach, Liveness, Registered, Registration, RunSpec, ShardChunk, ShardPixels, Submission, Task,
    TaskReply, Verdict,
};
use proto::pb;
use tokio::sync::watch;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::error::Error;
use crate::gate::Caller;
use crate::metrics::Metrics;
use crate::names::{MAX_NAME_BYTES, escape};
use crate::sessions::Sessions;
use crate::state::{
    HeartbeatAnswer, NodeResult, StateMachine, SubmitOutcome, TaskDecision, WorkerId,
};
use crate::transport::Transport;
use crate::update::TakenUpdate;

/// How long a `NextTask` call waits for work before answering `Wait`. Short enough that a worker
/// notices a restarted coordinator quickly, long enough that idle polling costs nothing.
const LONG_POLL: Duration = Duration::from_secs(2);

/// State shared by the handlers and the driver.
#[derive(Debug)]
pub struct Shared {
    state: Mutex<StateMachine>,
    /// Bumped on every state change: wakes long polls and the driver.
    changed: watch::Sender<u64>,
    /// The same count for threads outside the runtime (the mailboxes' servers), which must not
    /// wait on the runtime's timers: those panic once the runtime shuts down.
    generation: Mutex<u64>,
    generation_changed: Condvar,
    /// The mailboxes' server threads (`crate::mailbox_server`), joined when the run ends.
    mailbox_threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
    train: Arc<Dataset>,
    plan: ShardPlan,
    run: RunSpec,
    sessions: Arc<Sessions>,
    /// Registrations beyond this many live workers are refused.
    max_workers: usize,
    transport: Transport,
    /// Tensor and shard bytes (atomics) and node times (`crate::metrics`).
    metrics: Metrics,
    /// Why an update run on a mailbox thread panicked, for the driver to end the run with.
    update_panic: Mutex<Option<String>>,
}

impl Shared {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        state: StateMachine,
        train: Arc<Dataset>,
        plan: ShardPlan,
        run: RunSpec,
        sessions: Arc<Sessions>,
        max_workers: usize,
        transport: Transport,
        metrics: Metrics,
    ) -> Arc<Self> {
        Arc::new(Shared {
            state: Mutex::new(state),
            changed: watch::channel(0).0,
            generation: Mutex::new(0),
            generation_changed: Condvar::new(),
            mailbox_threads: Mutex::new(Vec::new()),
            train,
            plan,
            run,
            sessions,
            max_workers,
            transport,
            metrics,
            update_panic: Mutex::new(None),
        })
    }

    /// The state machine. The lock is never held across an `.await`.
    pub fn state(&self) -> MutexGuard<'_, StateMachine> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn transport(&self) -> &Transport {
        &self.transport
    }

    pub fn run(&self) -> &RunSpec {
        &self.run
    }

    pub fn plan(&self) -> &ShardPlan {
        &self.plan
    }

    /// The training set (the coordinator computes disputed nodes itself).
    pub fn train(&self) -> &Arc<Dataset> {
        &self.train
    }

    /// The examples of shard `shard`, row after row.
    pub fn shard_values(&self, shard: u32) -> &[f32] {
        self.train.row_values(self.plan.shard_range(shard as usize))
    }

    fn generation(&self) -> MutexGuard<'_, u64> {
        self.generation
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Keeps a mailbox's server thread, to join when the run ends (and drops those that
    /// ended, whose workers were forgotten, so that re-registrations do not pile them up).
    pub fn adopt_mailbox_thread(&self, thread: std::thread::JoinHandle<()>) {
        let mut threads = self
            .mailbox_threads
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        threads.retain(|t| !t.is_finished());
        threads.push(thread);
    }

    /// Closes every mailbox and waits for their threads, which then answer a long poll in
    /// progress at once and end: none outlives the run (or holds its directory open past it).
    pub fn stop_mailboxes(&self) {
        self.transport.close_mailboxes();
        self.notify();
        let threads = std::mem::take(
            &mut *self
                .mailbox_threads
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        );
        for thread in threads {
            let _ = thread.join();
        }
    }

    /// An update run on a mailbox thread panicked (`crate::update::apply_taken`): the driver ends
    /// the run with `message`.
    pub fn update_panicked(&self, message: String) {
        *self
            .update_panic
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(message);
        self.notify();
    }

    /// Why an update on a mailbox thread panicked, once.
    pub fn take_update_panic(&self) -> Option<String> {
        self.update_panic
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take()
    }

    /// Signals that the state changed.
    pub fn notify(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
        *self.generation() += 1;
        self.generation_changed.notify_all();
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Whether a registration may join: same protocol, a sane name, room for one more worker.
    /// The token was checked by the gate before the request was read.
    fn admit(&self, req: &Registration) -> Result<(), Status> {
        if req.name.len() > MAX_NAME_BYTES {
            return Err(Status::invalid_argument(format!(
                "worker name is {} bytes, at most {MAX_NAME_BYTES} are allowed: choose a \
                 shorter --name",
                req.name.len()
            )));
        }
        if req.protocol_version != proto::PROTOCOL_VERSION {
            return Err(Error::Version(format!(
                "worker `{}` speaks protocol {}, this coordinator speaks {}: run the same \
                 release on both sides",
                escape(&req.name, 64),
                req.protocol_version,
                proto::PROTOCOL_VERSION
            ))
            .into());
        }
        if self.sessions.len() >= self.max_workers {
            return Err(Status::resource_exhausted(format!(
                "{} workers are registered, the most this coordinator accepts (--max-workers)",
                self.max_workers
            )));
        }
        Ok(())
    }

    /// A worker is gone: its key names nobody from now on.
    pub fn forget_worker(&self, worker: WorkerId) {
        self.sessions.close(worker);
        self.transport.forget(worker.0);
    }

    /// A worker's next task, waiting up to [`LONG_POLL`] for one (`Wait` after that): the
    /// `NextTask` call over gRPC.
    pub async fn next_task(&self, worker: WorkerId) -> Result<TaskReply, Status> {
        let deadline = tokio::time::Instant::now() + LONG_POLL;
        let mut changed = self.subscribe();
        loop {
            changed.borrow_and_update();
            if let Some(reply) = self.poll_task(worker)? {
                return Ok(reply);
            }
            if tokio::time::timeout_at(deadline, changed.changed())
                .await
                .is_err()
            {
                return Ok(TaskReply::Wait);
            }
        }
    }

    /// [`Self::next_task`] for a thread outside the runtime: the `NextTask` call through a
    /// mailbox (`crate::mailbox_server`). Answers `Wait` early once `give_up` says so (checked
    /// at every state change).
    pub fn next_task_blocking(
        &self,
        worker: WorkerId,
        give_up: impl Fn() -> bool,
    ) -> Result<TaskReply, Status> {
        let deadline = Instant::now() + LONG_POLL;
        let mut generation = self.generation();
        loop {
            let seen = *generation;
            drop(generation);
            // Before the poll: a closed mailbox's thread must not take a task no one will read.
            if give_up() {
                return Ok(TaskReply::Wait);
            }
            if let Some(reply) = self.poll_task(worker)? {
                return Ok(reply);
            }
            generation = self.generation();
            while *generation == seen {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Ok(TaskReply::Wait);
                }
                generation = self
                    .generation_changed
                    .wait_timeout(generation, left)
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .0;
            }
        }
    }

    /// The state machine's answer to a `NextTask` now: `None` while there is nothing to do yet.
    fn poll_task(&self, worker: WorkerId) -> Result<Option<TaskReply>, Status> {
        let mut state = self.state();
        let reply = match state.next_task(worker, Instant::now()) {
            TaskDecision::Task(work) => {
                let params = self
                    .transport
                    .params_for(worker.0, work.global_step, state.params());
                self.metrics.params_sent(&params);
                TaskReply::Task(Task {
                    step: work.global_step,
                    epoch: work.epoch,
                    params,
                    nodes: work.nodes,
                    run_id: self.run.run_id.clone(),
                    next_examples: work.next_examples,
                })
            }
            TaskDecision::Done => TaskReply::Done("training has ended".into()),
            TaskDecision::UnknownWorker => {
                return Err(Status::not_found(format!(
                    "worker {worker} is not registered (declared lost or coordinator \
                     restarted): register again"
                )));
            }
            TaskDecision::Wait => return Ok(None),
        };
        tracing::trace!("next task answered");
        Ok(Some(reply))
    }

    /// A worker's results for a step, decoded, read and handed to the state machine: the
    /// `SubmitResult` call, over gRPC or through a mailbox. A result that does not decode
    /// removes the worker, so its work is redone.
    pub fn submit_result(&self, worker: WorkerId, request: pb::SubmitRequest) -> Verdict {
        self.submit_result_taking(worker, request, false).0
    }

    /// [`Shared::submit_result`], and the update of the step these results completed, taken
    /// under the same lock so that no other thread runs it
    /// ([`StateMachine::take_update_unless_held`]): for the caller to run once it has answered
    /// (`crate::update::apply_taken`).
    pub fn submit_result_taking_update(
        &self,
        worker: WorkerId,
        request: pb::SubmitRequest,
    ) -> (Verdict, Option<TakenUpdate>) {
        self.submit_result_taking(worker, request, true)
    }

    fn submit_result_taking(
        &self,
        worker: WorkerId,
        request: pb::SubmitRequest,
        take_update: bool,
    ) -> (Verdict, Option<TakenUpdate>) {
        let step = request.step;
        let (outcome, update) = match Submission::try_from(request) {
            Ok(submission) => self.submit(worker, submission, take_update),
            Err(e) => {
                let mut state = self.state();
                let name = state.worker_name(worker).unwrap_or("unknown").to_string();
                tracing::warn!(
                    "worker {worker} ({name}) sent an undecodable result for step {step}: {e}; \
                     removing it so its work is redone"
                );
                state.remove_worker(worker, format!("sent an undecodable result: {e}"));
                (SubmitOutcome::Rejected(e.to_string()), None)
            }
        };
        // A taken update notifies when it is done (`crate::update::apply`): waking the driver now
        // would only have it find the update gone, on a core the update needs.
        if update.is_none() {
            self.notify();
        }
        let verdict = match outcome {
            SubmitOutcome::Accepted => Verdict {
                accepted: true,
                reason: String::new(),
            },
            SubmitOutcome::Ignored(reason) => Verdict {
                accepted: true,
                reason,
            },
            SubmitOutcome::Rejected(reason) => Verdict {
                accepted: false,
                reason,
            },
        };
        (verdict, update)
    }

    /// Reads every result's gradient (inline or from shared memory) and hands the results to
    /// the state machine. A result that cannot be read removes the worker, so its work is redone.
    /// With `take_update`, also takes the update of the step the results completed, if any.
    fn submit(
        &self,
        worker: WorkerId,
        submission: Submission,
        take_update: bool,
    ) -> (SubmitOutcome, Option<TakenUpdate>) {
        tracing::trace!(%worker, "step {}: result arrives", submission.step);
        let compute_seconds = submission.compute_seconds;
        let mut results = Vec::with_capacity(submission.results.len());
        for r in submission.results {
            self.metrics.gradient_received(&r.grad);
            let (grad, magnitude) = match self.transport.resolve_gradient(worker.0, &r.grad) {
                Ok(resolved) => resolved,
                Err(e) => {
                    let mut state = self.state();
                    let name = state.worker_name(worker).unwrap_or("unknown").to_string();
                    tracing::warn!(
                        "worker {worker} ({name}) sent an unreadable result for step {}: {e}; \
                     removing it so its work is redone",
                        submission.step
                    );
                    state.remove_worker(worker, format!("sent an unreadable result: {e}"));
                    return (SubmitOutcome::Rejected(e.to_string()), None);
                }
            };
            results.push(NodeResult::arrived(r.node, grad, r.stats, magnitude));
        }
        tracing::trace!(%worker, "step {}: result read", submission.step);
        let (outcome, update) = {
            let mut state = self.state();
            let outcome = state.submit(
                worker,
                submission.step,
                results,
                compute_seconds,
                Instant::now(),
            );
            let update = take_update
                .then(|| state.take_update_unless_held())
                .flatten()
                .map(|job| TakenUpdate {
                    job,
                    taken: Instant::now(),
                });
            (outcome, update)
        };
        if outcome == SubmitOutcome::Accepted {
            self.metrics.node_computed(worker, compute_seconds);
        }
        (outcome, update)
    }
}

/// The tonic service over [`Shared`].
#[derive(Debug, Clone)]
pub struct TrainerService {
    shared: Arc<Shared>,
}

impl TrainerService {
    pub fn new(shared: Arc<Shared>) -> Self {
        TrainerService { shared }
    }

    /// The tonic server; `max_request_bytes` is the largest message it decodes (the gate caps
    /// each call lower still).
    pub fn into_server(self, max_request_bytes: usize) -> pb::trainer_server::TrainerServer<Self> {
        pb::trainer_server::TrainerServer::new(self)
            .max_decoding_message_size(max_request_bytes)
            .max_encoding_message_size(proto::MAX_MESSAGE_BYTES)
    }
}

type ShardStream = Pin<Box<dyn Stream<Item = Result<pb::ShardChunk, Status>> + Send>>;

/// A request that did not decode: the peer is of another version or broken.
fn bad_request(e: proto::WireError) -> Status {
    Error::BadRequest(e.to_string()).into()
}

/// The worker the gate resolved from the call's key.
fn caller<T>(request: &Request<T>) -> Result<WorkerId, Status> {
    request
        .extensions()
        .get::<Caller>()
        .map(|c| c.0)
        .ok_or_else(|| Status::unauthenticated("no worker key: register first"))
}

#[tonic::async_trait]
impl pb::trainer_server::Trainer for TrainerService {
    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterReply>, Status> {
        let peer = request
            .remote_addr()
            .map_or_else(|| "unknown address".to_string(), |a| a.to_string());
        let req = Registration::try_from(request.into_inner()).map_err(bad_request)?;
        let identity = escape(&req.name, MAX_NAME_BYTES);
        let refuse = |reason: &str| {
            tracing::warn!(
                "refused worker `{}` from {peer}: quarantined ({reason})",
                escape(&req.name, 64)
            );
            Status::permission_denied(format!(
                "this worker was quarantined for sending wrong results ({reason}): check its \
                 hardware and software, then start it under another --name"
            ))
        };
        let quarantined = self
            .shared
            .state()
            .quarantine_reason(&identity)
            .map(str::to_owned);
        if let Some(reason) = quarantined {
            return Err(refuse(&reason));
        }
        if let Err(status) = self.shared.admit(&req) {
            tracing::warn!(
                "refused worker `{}` from {peer}: {}",
                escape(&req.name, 64),
                status.message()
            );
            return Err(status);
        }
        let name = format!("{identity} ({peer})");
        let (id, worker_key) = {
            let mut state = self.shared.state();
            // Again under the lock that registers: a quarantine may have come since the check
            // above (a verdict on this worker's previous registration, say).
            if let Some(reason) = state.quarantine_reason(&identity).map(str::to_owned) {
                drop(state);
                return Err(refuse(&reason));
            }
            let id = state.register(name, Instant::now());
            (id, self.shared.sessions.open(id))
        };
        self.shared.notify();
        Ok(Response::new(
            Registered {
                worker_id: id.0,
                worker_key,
                run: self.shared.run.clone(),
                shared_memory: self.shared.transport.offer(),
            }
            .into(),
        ))
    }

    async fn attach_shared_memory(
        &self,
        request: Request<pb::AttachRequest>,
    ) -> Result<Response<pb::AttachReply>, Status> {
        let worker = caller(&request)?;
        let req = Attach::from(request.into_inner());
        let name = self.shared.state().worker_name(worker).map(str::to_owned);
        let attached = name.is_some() && self.shared.transport.attach(worker.0, &req);
        let mut mailbox = false;
        if attached {
            mailbox = crate::mailbox_server::start(&self.shared, worker);
            tracing::info!(
                "worker {worker} ({}) exchanges tensors through shared memory{}",
                name.unwrap_or_default(),
                if mailbox {
                    ", and its calls through a mailbox"
                } else {
                    ""
                }
            );
        }
        Ok(Response::new(pb::AttachReply { attached, mailbox }))
    }

    type FetchShardStream = ShardStream;

    async fn fetch_shard(
        &self,
        request: Request<pb::FetchShardRequest>,
    ) -> Result<Response<Self::FetchShardStream>, Status> {
        let worker = caller(&request)?;
        let req = request.into_inner();
        let shards = self.shared.plan.shards();
        if req.shard as usize >= shards {
            return Err(Error::BadRequest(format!(
                "shard {} does not exist: the run has {shards} shards",
                req.shard
            ))
            .into());
        }
        if !self.shared.state().holds_shard(worker, req.shard) {
            return Err(Status::permission_denied(format!(
                "shard {} is not part of this worker's current work: a worker may fetch only \
                 the shards of the nodes it has been given",
                req.shard
            )));
        }
        let range = self.shared.plan.shard_range(req.shard as usize);
        let dim = self.shared.train.dim();
        let shard = req.shard;
        let transport = &self.shared.transport;
        let in_file = if !transport.is_attached(worker.0) {
            false
        } else if transport.has_shard_file(shard) {
            true
        } else {
            let shared = Arc::clone(&self.shared);
            tokio::task::spawn_blocking(move || {
                shared
                    .transport
                    .shard_in_shared_memory(worker.0, shard, shared.shard_values(shard))
            })
            .await
            .unwrap_or(false)
        };
        if in_file {
            // One chunk naming the whole shard's region of its file.
            self.shared
                .metrics
                .shard_bytes_sent((range.len() * dim * 4) as u64);
            let chunk = ShardChunk {
                shard,
                first_example: range.start as u32,
                examples: range.len() as u32,
                dim: dim as u32,
                pixels: ShardPixels::SharedFile { offset: 0 },
            };
            return Ok(Response::new(Box::pin(tokio_stream::iter([Ok(
                chunk.into()
            )]))));
        }
        let rows_per_chunk = (proto::SHARD_CHUNK_BYTES / (4 * dim)).max(1);
        let train = Arc::clone(&self.shared.train);
        let metrics = self.shared.metrics.clone();
        // Chunks are encoded lazily, one at a time, as the client reads them.
        let chunks = range.clone().step_by(rows_per_chunk).map(move |start| {
            let end = (start + rows_per_chunk).min(range.end);
            let rows = train.rows(start..end);
            metrics.shard_bytes_sent((rows.len() * 4) as u64);
            let chunk = ShardChunk {
                shard,
                first_example: start as u32,
                examples: (end - start) as u32,
                dim: dim as u32,
                pixels: ShardPixels::Inline(rows.iter().copied().collect()),
            };
            Ok(chunk.into())
        });
        Ok(Response::new(Box::pin(tokio_stream::iter(chunks))))
    }

    async fn next_task(
        &self,
        request: Request<pb::NextTaskRequest>,
    ) -> Result<Response<pb::NextTaskReply>, Status> {
        let worker = caller(&request)?;
        let reply = self.shared.next_task(worker).await?;
        Ok(Response::new(reply.into()))
    }

    async fn submit_result(
        &self,
        request: Request<pb::SubmitRequest>,
    ) -> Result<Response<pb::SubmitReply>, Status> {
        let worker = caller(&request)?;
        let verdict = self.shared.submit_result(worker, request.into_inner());
        Ok(Response::new(verdict.into()))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatReply>, Status> {
        let worker = caller(&request)?;
        let answer = match self.shared.state().heartbeat(worker, Instant::now()) {
            HeartbeatAnswer::Known => Liveness::Known,
            HeartbeatAnswer::Unknown => Liveness::Unknown,
            HeartbeatAnswer::Done => Liveness::Done,
        };
        Ok(Response::new(answer.into()))
    }
}

//! The worker's life: connect (with retry and backoff), register, then fetch work, compute it on
//! the worker's own rayon pool, and return it, until the coordinator says training is done. If
//! the coordinator forgets us (we were declared lost, or it restarted) we register again; if it
//! goes away we retry for a bounded time and then exit with a clear error.

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::train::ReductionTree;
use proto::credentials::{Credentials, Token};
use proto::mailbox::{Answer, Call};
use proto::messages::{
    Attach, Liveness, Registered, Registration, Submission, TaskReply, TensorRef, Verdict,
};
use proto::pb;
use proto::pb::trainer_client::TrainerClient;
use proto::shared_memory::SharedClient;
use tokio::sync::watch;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tracing::Instrument;

use crate::compute::{self, Fault, IdleThreads, RunContext, StepBuffers};
use crate::error::{Error, Result};
use crate::mailbox_client::{MailboxClient, Outcome};
use crate::shard_cache::{Pixels, ShardAssembler, ShardCache, ShardData};

/// Between liveness messages. The coordinator's default timeout (3 s) allows several misses.
const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(500);
/// First retry delay when the coordinator cannot be reached; doubles up to [`MAX_BACKOFF`].
const INITIAL_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// Per-call deadline: well above a long poll (2 s) and a large submit, so only a dead or cut-off
/// peer hits it.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// HTTP/2 pings notice a silently dead connection (cut network) quickly.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(3);

/// A connection to the coordinator that adds our credentials to every call.
type Client = TrainerClient<InterceptedService<Channel, Credentials>>;

/// Settings of a worker process.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// `host:port` of the coordinator.
    pub addr: String,
    pub token: Option<Token>,
    /// TLS to the coordinator (loaded and checked); `None`: plaintext.
    pub tls: Option<ClientTlsConfig>,
    pub threads: usize,
    /// What the compute threads do between a step's parallel sections.
    pub idle_threads: IdleThreads,
    pub name: String,
    /// How long to keep retrying an unreachable coordinator before giving up.
    pub retry_for: Duration,
    /// Protocol version announced at registration (only tests change it).
    pub protocol_version: u32,
    /// Deliberate misbehaviour, for tests of the coordinator's defences.
    pub fault: Option<Fault>,
    /// Touched after every successful heartbeat, for container health checks.
    pub status_file: Option<std::path::PathBuf>,
    /// Accept the coordinator's shared-memory offer (when it is on this host).
    pub shared_memory: bool,
    /// Gather the rows the coordinator hints for the next step before that step's task comes.
    pub read_ahead: bool,
}

/// How long ago the status file was touched, if it exists.
pub fn status_age(path: &std::path::Path) -> Option<Duration> {
    let modified = std::fs::metadata(path).ok()?.modified().ok()?;
    Some(modified.elapsed().unwrap_or_default())
}

/// Runs until training ends (Ok) or the coordinator refuses us or stays unreachable (Err).
pub async fn run(config: WorkerConfig) -> Result<()> {
    let pool = Arc::new(
        rayon::ThreadPoolBuilder::new()
            .num_threads(config.threads)
            .thread_name(|i| format!("gradient-{i}"))
            .build()
            .map_err(|e| Error::Other(format!("cannot start {} threads: {e}", config.threads)))?,
    );
    let mut cache = ShardCache::default();
    let mut context: Option<Arc<RunContext>> = None;
    let mut fault = config.fault;
    let mut buffers = StepBuffers::default();
    loop {
        let (mut client, registered) = connect_and_register(&config).await?;
        let worker_id = registered.worker_id;
        let run = &registered.run;
        let same_run = context.as_ref().is_some_and(|c| c.run_id == run.run_id);
        if !same_run {
            cache.clear();
            context = Some(Arc::new(RunContext::new(run, config.idle_threads)?));
        }
        let ctx = Arc::clone(context.as_ref().expect("set above"));
        let (shared, mut mailbox) = match &registered.shared_memory {
            Some(offer) if config.shared_memory => attach(&mut client, worker_id, offer).await,
            _ => (None, None),
        };
        tracing::info!(
            "registered with {} as worker {worker_id:x} ({} threads, tensors {}{})",
            config.addr,
            config.threads,
            if shared.is_some() {
                "through shared memory"
            } else {
                "inline"
            },
            if mailbox.is_some() {
                ", calls through a mailbox"
            } else {
                ""
            }
        );
        let (done_tx, mut done_rx) = watch::channel(HeartbeatState::Alive);
        let heartbeat = tokio::spawn(heartbeat_loop(
            client.clone(),
            done_tx,
            config.status_file.clone(),
        ));
        // Trace events of the loop carry the worker's id, so that a run's trace with several
        // workers can be read worker by worker (`bench/trace_phases.py`).
        let span = tracing::trace_span!("session", worker = %format_args!("{worker_id:x}"));
        let outcome = work_loop(
            &mut client,
            &ctx,
            &pool,
            &mut cache,
            &mut done_rx,
            Transfer {
                shared: shared.as_ref(),
                mailbox: &mut mailbox,
                buffers: &mut buffers,
                fault: &mut fault,
                read_ahead: config.read_ahead,
            },
        )
        .instrument(span)
        .await;
        heartbeat.abort();
        match outcome {
            Ok(LoopEnd::Done) => {
                tracing::info!("training has ended; exiting");
                return Ok(());
            }
            Ok(LoopEnd::Reregister(why)) => {
                tracing::warn!("registering again: {why}");
            }
            Err(e) => return Err(e),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HeartbeatState {
    Alive,
    /// The last heartbeat failed (the coordinator is gone or cut off): a wait on the mailbox
    /// stops, and the service's own call says what happened.
    Unreachable,
    Forgotten,
    Done,
}

enum LoopEnd {
    Done,
    Reregister(String),
}

/// How a task's tensors move, and the buffers and test fault that go with it.
struct Transfer<'a> {
    shared: Option<&'a Arc<SharedClient>>,
    mailbox: &'a mut Option<MailboxClient>,
    buffers: &'a mut StepBuffers,
    fault: &'a mut Option<Fault>,
    read_ahead: bool,
}

/// Tries the coordinator's shared-memory offer: attached only if this worker can read the
/// probe file and the coordinator agrees it is the right one; with the mailbox the coordinator
/// made for this worker, if it made one.
async fn attach(
    client: &mut Client,
    worker_id: u64,
    offer: &proto::messages::SharedMemoryOffer,
) -> (Option<Arc<SharedClient>>, Option<MailboxClient>) {
    let (shared, probe) = match SharedClient::open(offer, worker_id) {
        Ok(opened) => opened,
        Err(e) => {
            tracing::debug!(
                "shared memory at {} not usable from here ({e}): tensors go inline",
                offer.dir.display()
            );
            return (None, None);
        }
    };
    let request = pb::AttachRequest::from(Attach { probe });
    let reply = match client.attach_shared_memory(request).await {
        Ok(reply) if reply.get_ref().attached => reply.into_inner(),
        Ok(_) => return (None, None),
        Err(status) => {
            tracing::debug!("shared memory refused: {}", describe(&status));
            return (None, None);
        }
    };
    let mailbox = match reply.mailbox.then(|| shared.open_mailbox()) {
        Some(Ok(mailbox)) => Some(MailboxClient::new(mailbox, CALL_TIMEOUT)),
        Some(Err(e)) => {
            tracing::warn!("cannot open the coordinator's mailbox ({e}): calls use gRPC");
            None
        }
        None => None,
    };
    (Some(Arc::new(shared)), mailbox)
}

/// How a registration's work went, logged when its loop ends (tests read it to check the paths).
#[derive(Debug, Default)]
struct Tally {
    /// Calls answered through the mailbox, and by the service.
    mailbox_calls: u64,
    service_calls: u64,
    in_place: u64,
    inline: u64,
    stale: u64,
    mapped: u64,
    streamed: u64,
    shards: u64,
    shards_gathered_ahead: u64,
}

impl Drop for Tally {
    fn drop(&mut self) {
        tracing::info!(
            "{} task(s) computed: parameters read in place {} time(s), decoded inline {}; {} \
             stale task(s) skipped; shards mapped from shared memory {}, streamed {}; calls \
             through the mailbox {}, through gRPC {}; rows gathered ahead for {} shard(s) of {} \
             computed",
            self.in_place + self.inline,
            self.in_place,
            self.inline,
            self.stale,
            self.mapped,
            self.streamed,
            self.mailbox_calls,
            self.service_calls,
            self.shards_gathered_ahead,
            self.shards
        );
    }
}

async fn work_loop(
    client: &mut Client,
    ctx: &Arc<RunContext>,
    pool: &Arc<rayon::ThreadPool>,
    cache: &mut ShardCache,
    heartbeat: &mut watch::Receiver<HeartbeatState>,
    transfer: Transfer<'_>,
) -> Result<LoopEnd> {
    let tree = ReductionTree::new(ctx.shards);
    // Logged when this registration's loop ends, however it ends.
    let mut tally = Tally::default();
    if transfer.shared.is_none() && matches!(transfer.fault, Some(Fault::RewriteFromStep(_))) {
        tracing::warn!("no shared memory, so nothing to overwrite (--inject-fault rewrite@STEP)");
    }
    loop {
        match *heartbeat.borrow() {
            HeartbeatState::Done => return Ok(LoopEnd::Done),
            HeartbeatState::Forgotten => {
                return Ok(LoopEnd::Reregister(
                    "the coordinator no longer knows this worker".into(),
                ));
            }
            HeartbeatState::Alive | HeartbeatState::Unreachable => {}
        }
        let answer =
            match through_mailbox(transfer.mailbox, heartbeat, Call::encode_next_task, || {}).await
            {
                Ok(answer) => answer,
                Err(end) => return Ok(end),
            };
        let wire = match answer {
            Some(Answer::NextTask(reply)) => {
                tally.mailbox_calls += 1;
                reply
            }
            Some(Answer::Error(why)) => return Ok(LoopEnd::Reregister(why)),
            Some(Answer::SubmitResult(_)) => {
                return Err(Error::Protocol(
                    "the coordinator answered NextTask with a SubmitResult reply".into(),
                ));
            }
            None => match client.next_task(pb::NextTaskRequest {}).await {
                Ok(reply) => {
                    tally.service_calls += 1;
                    reply.into_inner()
                }
                Err(status) => return Ok(LoopEnd::Reregister(describe(&status))),
            },
        };
        let reply = TaskReply::try_from(wire).map_err(|e| Error::Protocol(e.to_string()))?;
        let mut task = match reply {
            TaskReply::Task(task) => task,
            TaskReply::Wait => continue,
            TaskReply::Done(reason) => {
                tracing::info!("coordinator: {reason}");
                return Ok(LoopEnd::Done);
            }
        };
        if task.run_id != ctx.run_id {
            return Ok(LoopEnd::Reregister(
                "the coordinator now serves another run".into(),
            ));
        }
        let mut withdrawn = None;
        let fetch_started = std::time::Instant::now();
        let mut fetched = 0;
        'fetch: for work in &task.nodes {
            for shard in &work.shards {
                if !cache.contains(shard.shard) {
                    match fetch_shard(client, shard.shard, transfer.shared).await {
                        Ok(data) => {
                            match data.pixels {
                                Pixels::Mapped(_) => tally.mapped += 1,
                                Pixels::Received(_) => tally.streamed += 1,
                            }
                            cache.insert(shard.shard, data);
                            fetched += 1;
                        }
                        Err(FetchError::Withdrawn(why)) => {
                            withdrawn = Some(why);
                            break 'fetch;
                        }
                        Err(FetchError::Rpc(why)) => return Ok(LoopEnd::Reregister(why)),
                        Err(FetchError::Invalid(e)) => return Err(e),
                    }
                }
            }
        }
        if fetched > 0 {
            tracing::debug!(
                "step {}: {fetched} shard(s) fetched in {:.1} ms",
                task.step,
                fetch_started.elapsed().as_secs_f64() * 1e3
            );
        }
        if let Some(why) = withdrawn {
            // The step finished without us (a backup delivered our node first): next task.
            tracing::info!(
                "step {}: task withdrawn while fetching data: {why}",
                task.step
            );
            continue;
        }
        let step = task.step;
        tracing::trace!("step {step}: task received");
        let mut hint = compute::next_step_hint(&mut task);
        if !transfer.read_ahead {
            hint.clear();
        }
        let Some(output) = compute::run_task(
            ctx,
            &tree,
            pool,
            cache,
            task,
            transfer.shared,
            transfer.buffers,
            transfer.fault,
        )
        .await?
        else {
            tally.stale += 1;
            continue;
        };
        tally.shards += output.shards;
        tally.shards_gathered_ahead += output.shards_gathered_ahead;
        if output.params_in_place {
            tally.in_place += 1;
        } else {
            tally.inline += 1;
        }
        tracing::trace!("step {step}: computed");
        // Where the results were written, if a test fault has them overwritten once accepted.
        let rewrite =
            transfer.shared.is_some() && transfer.fault.is_some_and(|f| f.rewrites_step(step));
        let to_rewrite: Vec<(u64, u64)> = if rewrite {
            output
                .results
                .iter()
                .filter_map(|result| match result.grad {
                    TensorRef::Shared { offset, len } => Some((offset, len)),
                    _ => None,
                })
                .collect()
        } else {
            Vec::new()
        };
        let submission = pb::SubmitRequest::from(Submission {
            step,
            results: output.results,
            compute_seconds: output.compute_seconds,
        });
        let request = || Call::encode_submit_result(&submission);
        // The next step's rows are read while the coordinator checks this result (our compute
        // threads are idle; its check runs beside this gather), else once it has answered, while
        // it applies the step.
        let dim = ctx.engine.config().input_dim;
        let mut gathered = false;
        let gather_ahead = || {
            cache.gather_ahead(&hint, dim);
            gathered = true;
        };
        let answer = match through_mailbox(transfer.mailbox, heartbeat, request, gather_ahead).await
        {
            Ok(answer) => answer,
            Err(end) => return Ok(end),
        };
        let reply = match answer {
            Some(Answer::SubmitResult(reply)) => {
                tally.mailbox_calls += 1;
                Ok(reply)
            }
            Some(Answer::Error(why)) => return Ok(LoopEnd::Reregister(why)),
            Some(Answer::NextTask(_)) => {
                return Err(Error::Protocol(
                    "the coordinator answered SubmitResult with a NextTask reply".into(),
                ));
            }
            None => {
                let reply = client.submit_result(submission).await;
                tally.service_calls += u64::from(reply.is_ok());
                reply.map(tonic::Response::into_inner)
            }
        };
        match reply {
            Ok(reply) => {
                tracing::trace!("step {step}: submitted");
                let verdict = Verdict::from(reply);
                if verdict.accepted && !to_rewrite.is_empty() {
                    rewrite_accepted(transfer.shared, step, &to_rewrite);
                }
                if !gathered {
                    cache.gather_ahead(&hint, dim);
                }
                if !verdict.accepted {
                    tracing::warn!(
                        "coordinator rejected our result for step {step}: {}",
                        verdict.reason
                    );
                } else if !verdict.reason.is_empty() {
                    tracing::info!("result for step {step} not used: {}", verdict.reason);
                }
            }
            Err(status) => return Ok(LoopEnd::Reregister(describe(&status))),
        }
    }
}

/// Overwrites this worker's accepted results for `step` with NaN where it wrote them, against the
/// protocol (`--inject-fault rewrite@STEP`): the coordinator's update may still be reading them.
fn rewrite_accepted(shared: Option<&Arc<SharedClient>>, step: u64, regions: &[(u64, u64)]) {
    let Some(shared) = shared else { return };
    for &(offset, len) in regions {
        match shared.overwrite_gradients(offset, len, f32::NAN) {
            Ok(()) => tracing::warn!(
                "step {step}: overwrote our accepted gradient in shared memory with NaN \
                 (--inject-fault)"
            ),
            Err(e) => tracing::warn!("step {step}: cannot overwrite our gradient: {e}"),
        }
    }
}

/// A call through this worker's mailbox, if it has one: the answer, `None` when the service
/// must take the call, or how the loop ends when a posted call was given up on. `meanwhile`
/// runs while the coordinator handles a posted call.
async fn through_mailbox(
    mailbox: &mut Option<MailboxClient>,
    heartbeat: &watch::Receiver<HeartbeatState>,
    request: impl FnOnce() -> Vec<u8>,
    meanwhile: impl FnOnce(),
) -> Result<Option<Answer>, LoopEnd> {
    let Some(mailbox) = mailbox.as_mut() else {
        return Ok(None);
    };
    let alive = || *heartbeat.borrow() == HeartbeatState::Alive;
    match mailbox.call(&request(), alive, meanwhile).await {
        Outcome::Answered(answer) => Ok(Some(answer)),
        Outcome::UseService => Ok(None),
        Outcome::GiveUp(_) if *heartbeat.borrow() == HeartbeatState::Done => Err(LoopEnd::Done),
        Outcome::GiveUp(why) => Err(LoopEnd::Reregister(why)),
    }
}

enum FetchError {
    /// The shard is no longer part of our work.
    Withdrawn(String),
    Rpc(String),
    Invalid(Error),
}

/// One shard's examples: streamed, or read from its file when `shared` (this worker is
/// attached to shared memory) and the coordinator wrote one.
async fn fetch_shard(
    client: &mut Client,
    shard: u32,
    shared: Option<&Arc<SharedClient>>,
) -> Result<ShardData, FetchError> {
    let mut stream = client
        .fetch_shard(pb::FetchShardRequest { shard })
        .await
        .map_err(|s| match s.code() {
            tonic::Code::PermissionDenied => FetchError::Withdrawn(s.message().to_string()),
            _ => FetchError::Rpc(describe(&s)),
        })?
        .into_inner();
    let mut shard_data = ShardAssembler::new(shard).reading_shared_files(shared.cloned());
    while let Some(chunk) = stream
        .message()
        .await
        .map_err(|s| FetchError::Rpc(describe(&s)))?
    {
        shard_data.push(chunk).map_err(FetchError::Invalid)?;
    }
    shard_data.finish().map_err(FetchError::Invalid)
}

async fn heartbeat_loop(
    mut client: Client,
    state: watch::Sender<HeartbeatState>,
    status_file: Option<std::path::PathBuf>,
) {
    let mut ticker = tokio::time::interval(HEARTBEAT_INTERVAL);
    loop {
        ticker.tick().await;
        let Ok(reply) = client.heartbeat(pb::HeartbeatRequest {}).await else {
            state.send_if_modified(|s| {
                let changed = *s == HeartbeatState::Alive;
                if changed {
                    *s = HeartbeatState::Unreachable;
                }
                changed
            });
            continue;
        };
        if let Some(path) = &status_file {
            // Best effort: a failed touch only makes the health check pessimistic.
            let _ = std::fs::write(path, b"alive\n");
        }
        let next = match Liveness::from(reply.into_inner()) {
            Liveness::Done => HeartbeatState::Done,
            Liveness::Unknown => HeartbeatState::Forgotten,
            Liveness::Known => HeartbeatState::Alive,
        };
        if next != HeartbeatState::Alive {
            let _ = state.send(next);
            return;
        }
        state.send_if_modified(|s| {
            let changed = *s == HeartbeatState::Unreachable;
            if changed {
                *s = HeartbeatState::Alive;
            }
            changed
        });
    }
}

/// Dials and registers, retrying unreachable coordinators with exponential backoff until
/// `retry_for` has passed. A refusal (version, token) is final.
async fn connect_and_register(config: &WorkerConfig) -> Result<(Client, Registered)> {
    let uri = if config.addr.contains("://") {
        config.addr.clone()
    } else if config.tls.is_some() {
        format!("https://{}", config.addr)
    } else {
        format!("http://{}", config.addr)
    };
    let mut endpoint = Endpoint::from_shared(uri.clone())
        .map_err(|e| Error::Other(format!("--addr `{}` is not an address: {e}", config.addr)))?
        .connect_timeout(Duration::from_secs(3))
        .timeout(CALL_TIMEOUT)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        .initial_stream_window_size(proto::STREAM_WINDOW_BYTES)
        .initial_connection_window_size(proto::CONNECTION_WINDOW_BYTES)
        .max_frame_size(proto::MAX_FRAME_BYTES)
        .tcp_nodelay(true);
    if let Some(tls) = &config.tls {
        endpoint = endpoint
            .tls_config(tls.clone())
            .map_err(|e| Error::Other(format!("TLS settings: {e}: {}", source_chain(&e))))?;
    }
    let credentials = Credentials::new(config.token.clone());
    let client = |channel: Channel, credentials: Credentials| {
        TrainerClient::with_interceptor(channel, credentials)
            .max_decoding_message_size(proto::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(proto::MAX_MESSAGE_BYTES)
    };
    let started = Instant::now();
    let mut backoff = INITIAL_BACKOFF;
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let attempt = async {
            let channel = endpoint
                .connect()
                .await
                .map_err(|e| format!("{e}: {}", source_chain(&e)))?;
            let mut unregistered = client(channel.clone(), credentials.clone());
            let registration = Registration {
                protocol_version: config.protocol_version,
                name: config.name.clone(),
                threads: config.threads as u32,
                build: env!("CARGO_PKG_VERSION").into(),
            };
            let reply = unregistered
                .register(pb::RegisterRequest::from(registration))
                .await;
            Ok::<_, String>((channel, reply))
        };
        let last_error = match attempt.await {
            Ok((channel, Ok(reply))) => {
                let registered = Registered::try_from(reply.into_inner())
                    .map_err(|e| Error::Protocol(e.to_string()))?;
                let registered_client =
                    client(channel, credentials.with_key(registered.worker_key));
                return Ok((registered_client, registered));
            }
            Ok((_, Err(status)))
                if matches!(
                    status.code(),
                    tonic::Code::FailedPrecondition
                        | tonic::Code::Unauthenticated
                        | tonic::Code::PermissionDenied
                        | tonic::Code::InvalidArgument
                        | tonic::Code::ResourceExhausted
                ) =>
            {
                return Err(Error::Refused {
                    addr: config.addr.clone(),
                    reason: status.message().to_string(),
                });
            }
            Ok((_, Err(status))) => describe(&status),
            Err(e) => e,
        };
        let elapsed = started.elapsed();
        if elapsed >= config.retry_for {
            return Err(Error::Unreachable {
                addr: config.addr.clone(),
                seconds: elapsed.as_secs_f64(),
                last_error,
            });
        }
        if attempts == 1 || attempts.is_multiple_of(10) {
            tracing::info!(
                "coordinator at {} not reachable yet ({last_error}); retrying",
                config.addr
            );
        }
        tokio::time::sleep(backoff.min(config.retry_for.saturating_sub(elapsed))).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

fn describe(status: &tonic::Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut parts = Vec::new();
    let mut source = e.source();
    while let Some(s) = source {
        parts.push(s.to_string());
        source = s.source();
    }
    parts.join(": ")
}

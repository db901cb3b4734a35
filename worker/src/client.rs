//! The worker's life: connect (with retry and backoff), register, then fetch work, compute it on
//! the worker's own rayon pool, and return it, until the coordinator says training is done. If
//! the coordinator forgets us (we were declared lost, or it restarted) we register again; if it
//! goes away we retry for a bounded time and then exit with a clear error.

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::reduce::ReductionTree;
use proto::next_task_reply::Kind;
use proto::trainer_client::TrainerClient;
use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint};

use crate::compute::{self, Fault, RunContext};
use crate::error::{Error, Result};
use crate::shard_cache::{ShardCache, ShardData};

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

/// Settings of a worker process.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// `host:port` of the coordinator.
    pub addr: String,
    pub token: Option<String>,
    pub threads: usize,
    pub name: String,
    /// How long to keep retrying an unreachable coordinator before giving up.
    pub retry_for: Duration,
    /// Protocol version announced at registration (only tests change it).
    pub protocol_version: u32,
    /// Deliberate misbehaviour, for tests of the coordinator's defences.
    pub fault: Option<Fault>,
    /// Touched after every successful heartbeat, for container health checks.
    pub status_file: Option<std::path::PathBuf>,
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
    loop {
        let (mut client, worker_id, run) = connect_and_register(&config).await?;
        let same_run = context.as_ref().is_some_and(|c| c.run_id == run.run_id);
        if !same_run {
            cache.clear();
            context = Some(Arc::new(RunContext::from_proto(&run)?));
        }
        let ctx = Arc::clone(context.as_ref().expect("set above"));
        tracing::info!(
            "registered with {} as worker {worker_id:x} ({} threads)",
            config.addr,
            config.threads
        );
        let (done_tx, mut done_rx) = watch::channel(HeartbeatState::Alive);
        let heartbeat = tokio::spawn(heartbeat_loop(
            client.clone(),
            worker_id,
            done_tx,
            config.status_file.clone(),
        ));
        let outcome = work_loop(
            &mut client,
            worker_id,
            &ctx,
            &pool,
            &mut cache,
            &mut done_rx,
            &mut fault,
        )
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
    Forgotten,
    Done,
}

enum LoopEnd {
    Done,
    Reregister(String),
}

async fn work_loop(
    client: &mut TrainerClient<Channel>,
    worker_id: u64,
    ctx: &Arc<RunContext>,
    pool: &Arc<rayon::ThreadPool>,
    cache: &mut ShardCache,
    heartbeat: &mut watch::Receiver<HeartbeatState>,
    fault: &mut Option<Fault>,
) -> Result<LoopEnd> {
    let tree = ReductionTree::new(ctx.shards);
    loop {
        match *heartbeat.borrow() {
            HeartbeatState::Done => return Ok(LoopEnd::Done),
            HeartbeatState::Forgotten => {
                return Ok(LoopEnd::Reregister(
                    "the coordinator no longer knows this worker".into(),
                ));
            }
            HeartbeatState::Alive => {}
        }
        let reply = match client.next_task(proto::NextTaskRequest { worker_id }).await {
            Ok(reply) => reply.into_inner(),
            Err(status) => return Ok(LoopEnd::Reregister(describe(&status))),
        };
        let task = match reply.kind {
            Some(Kind::Task(task)) => task,
            Some(Kind::Wait(_)) | None => continue,
            Some(Kind::Done(done)) => {
                tracing::info!("coordinator: {}", done.reason);
                return Ok(LoopEnd::Done);
            }
        };
        for node in &task.nodes {
            for shard in &node.shards {
                if !cache.contains(shard.shard) {
                    match fetch_shard(client, worker_id, shard.shard).await {
                        Ok(data) => cache.insert(shard.shard, data),
                        Err(FetchError::Rpc(why)) => return Ok(LoopEnd::Reregister(why)),
                        Err(FetchError::Invalid(e)) => return Err(e),
                    }
                }
            }
        }
        let started = Instant::now();
        let step = task.step;
        let results = compute::run_task(ctx, &tree, pool, cache, task, fault).await?;
        let compute_seconds = started.elapsed().as_secs_f64();
        let reply = client
            .submit_result(proto::SubmitRequest {
                worker_id,
                step,
                results,
                compute_seconds,
            })
            .await;
        match reply {
            Ok(reply) => {
                let reply = reply.into_inner();
                if !reply.accepted {
                    tracing::warn!(
                        "coordinator rejected our result for step {step}: {}",
                        reply.reason
                    );
                } else if !reply.reason.is_empty() {
                    tracing::info!("result for step {step} not used: {}", reply.reason);
                }
            }
            Err(status) => return Ok(LoopEnd::Reregister(describe(&status))),
        }
    }
}

enum FetchError {
    Rpc(String),
    Invalid(Error),
}

async fn fetch_shard(
    client: &mut TrainerClient<Channel>,
    worker_id: u64,
    shard: u32,
) -> Result<ShardData, FetchError> {
    let mut stream = client
        .fetch_shard(proto::FetchShardRequest { worker_id, shard })
        .await
        .map_err(|s| FetchError::Rpc(describe(&s)))?
        .into_inner();
    let mut data: Option<ShardData> = None;
    let invalid = |msg: String| FetchError::Invalid(Error::Protocol(msg));
    while let Some(chunk) = stream
        .message()
        .await
        .map_err(|s| FetchError::Rpc(describe(&s)))?
    {
        if chunk.shard != shard
            || chunk.pixels.len() != chunk.examples as usize * chunk.dim as usize * 4
        {
            return Err(invalid(format!(
                "shard {shard}: chunk for shard {} with {} bytes for {} examples of {} values",
                chunk.shard,
                chunk.pixels.len(),
                chunk.examples,
                chunk.dim
            )));
        }
        let d = data.get_or_insert_with(|| ShardData {
            first_example: chunk.first_example,
            examples: 0,
            dim: chunk.dim as usize,
            pixels: Vec::new(),
        });
        if chunk.first_example != d.first_example + d.examples || chunk.dim as usize != d.dim {
            return Err(invalid(format!(
                "shard {shard}: chunks out of order or of mixed sizes"
            )));
        }
        d.pixels.extend(
            proto::tensor::decode_f32(&chunk.pixels).expect("length checked to be 4 * values"),
        );
        d.examples += chunk.examples;
    }
    data.ok_or_else(|| invalid(format!("shard {shard} arrived empty")))
}

async fn heartbeat_loop(
    mut client: TrainerClient<Channel>,
    worker_id: u64,
    state: watch::Sender<HeartbeatState>,
    status_file: Option<std::path::PathBuf>,
) {
    let mut ticker = tokio::time::interval(HEARTBEAT_INTERVAL);
    loop {
        ticker.tick().await;
        if let Ok(reply) = client
            .heartbeat(proto::HeartbeatRequest { worker_id })
            .await
        {
            let reply = reply.into_inner();
            if let Some(path) = &status_file {
                // Best effort: a failed touch only makes the health check pessimistic.
                let _ = std::fs::write(path, b"alive\n");
            }
            let next = if reply.done {
                HeartbeatState::Done
            } else if !reply.known {
                HeartbeatState::Forgotten
            } else {
                HeartbeatState::Alive
            };
            if next != HeartbeatState::Alive {
                let _ = state.send(next);
                return;
            }
        }
    }
}

/// Dials and registers, retrying unreachable coordinators with exponential backoff until
/// `retry_for` has passed. A refusal (version, token) is final.
async fn connect_and_register(
    config: &WorkerConfig,
) -> Result<(TrainerClient<Channel>, u64, proto::RunConfig)> {
    let uri = if config.addr.contains("://") {
        config.addr.clone()
    } else {
        format!("http://{}", config.addr)
    };
    let endpoint = Endpoint::from_shared(uri.clone())
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
            let mut client = TrainerClient::new(channel)
                .max_decoding_message_size(proto::MAX_MESSAGE_BYTES)
                .max_encoding_message_size(proto::MAX_MESSAGE_BYTES);
            let reply = client
                .register(proto::RegisterRequest {
                    protocol_version: config.protocol_version,
                    token: config.token.clone().unwrap_or_default(),
                    name: config.name.clone(),
                    capabilities: Some(proto::Capabilities {
                        threads: config.threads as u32,
                        build: env!("CARGO_PKG_VERSION").into(),
                    }),
                })
                .await;
            Ok::<_, String>((client, reply))
        };
        let last_error = match attempt.await {
            Ok((client, Ok(reply))) => {
                let reply = reply.into_inner();
                let run = reply.config.ok_or_else(|| {
                    Error::Protocol("registration reply without a run configuration".into())
                })?;
                return Ok((client, reply.worker_id, run));
            }
            Ok((_, Err(status)))
                if matches!(
                    status.code(),
                    tonic::Code::FailedPrecondition
                        | tonic::Code::Unauthenticated
                        | tonic::Code::PermissionDenied
                        | tonic::Code::InvalidArgument
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

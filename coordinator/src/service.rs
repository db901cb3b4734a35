//! The gRPC service: each handler validates and converts its request, makes one call on the
//! state machine, and maps the result back. No training logic lives here.

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::data::Dataset;
use common::shard::ShardPlan;
use tokio::sync::watch;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::convert::{f32_to_bytes, node_result_from_proto, task_to_proto};
use crate::error::Error;
use crate::state::{HeartbeatAnswer, StateMachine, SubmitOutcome, TaskDecision, WorkerId};

/// How long a `NextTask` call waits for work before answering `Wait`. Short enough that a worker
/// notices a restarted coordinator quickly, long enough that idle polling costs nothing.
const LONG_POLL: Duration = Duration::from_secs(2);

/// State shared by the handlers and the driver.
#[derive(Debug)]
pub struct Shared {
    state: Mutex<StateMachine>,
    /// Bumped on every state change: wakes long polls and the driver.
    changed: watch::Sender<u64>,
    train: Arc<Dataset>,
    plan: ShardPlan,
    run: proto::RunConfig,
    token: Option<String>,
    /// The current parameters as wire bytes, encoded once per step and shared by all tasks.
    params_cache: Mutex<Option<(u64, Bytes)>>,
}

impl Shared {
    pub fn new(
        state: StateMachine,
        train: Arc<Dataset>,
        plan: ShardPlan,
        run: proto::RunConfig,
        token: Option<String>,
    ) -> Arc<Self> {
        Arc::new(Shared {
            state: Mutex::new(state),
            changed: watch::channel(0).0,
            train,
            plan,
            run,
            token,
            params_cache: Mutex::new(None),
        })
    }

    /// The state machine. The lock is never held across an `.await`.
    pub fn state(&self) -> MutexGuard<'_, StateMachine> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Signals that the state changed.
    pub fn notify(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn params_bytes(&self, global_step: u64, params: &[f32]) -> Bytes {
        let mut cache = self
            .params_cache
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match &*cache {
            Some((step, bytes)) if *step == global_step => bytes.clone(),
            _ => {
                let bytes = f32_to_bytes(params);
                *cache = Some((global_step, bytes.clone()));
                bytes
            }
        }
    }

    fn check_version_and_token(&self, req: &proto::RegisterRequest) -> Result<(), Error> {
        if req.protocol_version != proto::PROTOCOL_VERSION {
            return Err(Error::Version(format!(
                "worker `{}` speaks protocol {}, this coordinator speaks {}: run the same \
                 release on both sides",
                req.name,
                req.protocol_version,
                proto::PROTOCOL_VERSION
            )));
        }
        match &self.token {
            Some(token) if *token != req.token => Err(Error::Auth(format!(
                "worker `{}` presented {} token: set the same --token (or VAE_TOKEN) on \
                 coordinator and workers",
                req.name,
                if req.token.is_empty() {
                    "no"
                } else {
                    "the wrong"
                }
            ))),
            _ => Ok(()),
        }
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

    pub fn into_server(self) -> proto::trainer_server::TrainerServer<Self> {
        proto::trainer_server::TrainerServer::new(self)
            .max_decoding_message_size(proto::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(proto::MAX_MESSAGE_BYTES)
    }
}

type ShardStream = Pin<Box<dyn Stream<Item = Result<proto::ShardChunk, Status>> + Send>>;

#[tonic::async_trait]
impl proto::trainer_server::Trainer for TrainerService {
    async fn register(
        &self,
        request: Request<proto::RegisterRequest>,
    ) -> Result<Response<proto::RegisterReply>, Status> {
        let peer = request
            .remote_addr()
            .map_or_else(|| "unknown address".to_string(), |a| a.to_string());
        let req = request.into_inner();
        if let Err(e) = self.shared.check_version_and_token(&req) {
            tracing::warn!("refused worker `{}` from {peer}: {e}", req.name);
            return Err(e.into());
        }
        let name = format!("{} ({peer})", req.name);
        let id = self.shared.state().register(name, Instant::now());
        self.shared.notify();
        Ok(Response::new(proto::RegisterReply {
            worker_id: id.0,
            config: Some(self.shared.run.clone()),
        }))
    }

    type FetchShardStream = ShardStream;

    async fn fetch_shard(
        &self,
        request: Request<proto::FetchShardRequest>,
    ) -> Result<Response<Self::FetchShardStream>, Status> {
        let req = request.into_inner();
        let shards = self.shared.plan.shards();
        if req.shard as usize >= shards {
            return Err(Error::BadRequest(format!(
                "shard {} does not exist: the run has {shards} shards",
                req.shard
            ))
            .into());
        }
        let range = self.shared.plan.shard_range(req.shard as usize);
        let dim = self.shared.train.dim();
        let rows_per_chunk = (proto::SHARD_CHUNK_BYTES / (4 * dim)).max(1);
        let train = Arc::clone(&self.shared.train);
        let shard = req.shard;
        // Chunks are encoded lazily, one at a time, as the client reads them.
        let chunks = range.clone().step_by(rows_per_chunk).map(move |start| {
            let end = (start + rows_per_chunk).min(range.end);
            let rows = train.rows(start..end);
            let pixels = match rows.as_slice() {
                Some(slice) => f32_to_bytes(slice),
                None => f32_to_bytes(&rows.iter().copied().collect::<Vec<f32>>()),
            };
            Ok(proto::ShardChunk {
                shard,
                first_example: start as u32,
                examples: (end - start) as u32,
                dim: dim as u32,
                pixels,
            })
        });
        Ok(Response::new(Box::pin(tokio_stream::iter(chunks))))
    }

    async fn next_task(
        &self,
        request: Request<proto::NextTaskRequest>,
    ) -> Result<Response<proto::NextTaskReply>, Status> {
        use proto::next_task_reply::Kind;
        let worker = WorkerId(request.into_inner().worker_id);
        let deadline = tokio::time::Instant::now() + LONG_POLL;
        let mut changed = self.shared.subscribe();
        loop {
            changed.borrow_and_update();
            let decision = {
                let mut state = self.shared.state();
                match state.next_task(worker, Instant::now()) {
                    TaskDecision::Task(task) => {
                        let params = self.shared.params_bytes(task.global_step, state.params());
                        Some(Kind::Task(task_to_proto(&task, params)))
                    }
                    TaskDecision::Done => Some(Kind::Done(proto::Done {
                        reason: "training has ended".into(),
                    })),
                    TaskDecision::UnknownWorker => {
                        return Err(Status::not_found(format!(
                            "worker {worker} is not registered (declared lost or coordinator \
                             restarted): register again"
                        )));
                    }
                    TaskDecision::Wait => None,
                }
            };
            if let Some(kind) = decision {
                return Ok(Response::new(proto::NextTaskReply { kind: Some(kind) }));
            }
            if tokio::time::timeout_at(deadline, changed.changed())
                .await
                .is_err()
            {
                return Ok(Response::new(proto::NextTaskReply {
                    kind: Some(Kind::Wait(proto::Wait {})),
                }));
            }
        }
    }

    async fn submit_result(
        &self,
        request: Request<proto::SubmitRequest>,
    ) -> Result<Response<proto::SubmitReply>, Status> {
        let req = request.into_inner();
        let worker = WorkerId(req.worker_id);
        let results: Result<Vec<_>, Error> = req
            .results
            .into_iter()
            .map(node_result_from_proto)
            .collect();
        let outcome = match results {
            Ok(results) => self.shared.state().submit(
                worker,
                req.step,
                results,
                req.compute_seconds,
                Instant::now(),
            ),
            Err(e) => {
                let mut state = self.shared.state();
                let name = state.worker_name(worker).unwrap_or("unknown").to_string();
                tracing::warn!(
                    "worker {worker} ({name}) sent an undecodable result for step {}: {e}; \
                     removing it so its work is redone",
                    req.step
                );
                state.remove_worker(worker, format!("sent an undecodable result: {e}"));
                SubmitOutcome::Rejected(e.to_string())
            }
        };
        self.shared.notify();
        let (accepted, reason) = match outcome {
            SubmitOutcome::Accepted => (true, String::new()),
            SubmitOutcome::Ignored(reason) => (true, reason),
            SubmitOutcome::Rejected(reason) => (false, reason),
        };
        Ok(Response::new(proto::SubmitReply { accepted, reason }))
    }

    async fn heartbeat(
        &self,
        request: Request<proto::HeartbeatRequest>,
    ) -> Result<Response<proto::HeartbeatReply>, Status> {
        let worker = WorkerId(request.into_inner().worker_id);
        let answer = self.shared.state().heartbeat(worker, Instant::now());
        Ok(Response::new(proto::HeartbeatReply {
            known: answer == HeartbeatAnswer::Known,
            done: answer == HeartbeatAnswer::Done,
        }))
    }
}

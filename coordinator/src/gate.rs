//! The one place every call passes before a handler sees it: the run's token is checked, the
//! worker key is resolved to the registered worker it names (handlers trust nothing else about
//! who is calling), and the request body is capped at the size its RPC can legitimately need.
//! All of it happens on the headers, before a byte of the body is read (docs/security.md).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use proto::credentials::{Token, WorkerKey};
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::http;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

use crate::metrics::{Metrics, Refusal};
use crate::names::escape;
use crate::sessions::Sessions;
use crate::state::WorkerId;

/// Cap on every request but `SubmitResult`: registration, polls and heartbeats are tiny.
pub const SMALL_REQUEST_BYTES: usize = 64 << 10;

/// The registered worker a call comes from, as the gate resolved it from the call's key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller(pub WorkerId);

/// The RPCs, told apart by path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rpc {
    Register,
    SubmitResult,
    /// Any other call of the service: needs a worker key.
    Worker,
    /// Not ours (tonic answers `Unimplemented`).
    Other,
}

fn rpc(path: &str) -> Rpc {
    let Some(method) = path
        .strip_prefix('/')
        .and_then(|p| p.strip_prefix(proto::pb::trainer_server::SERVICE_NAME))
        .and_then(|p| p.strip_prefix('/'))
    else {
        return Rpc::Other;
    };
    match method {
        "Register" => Rpc::Register,
        "SubmitResult" => Rpc::SubmitResult,
        _ => Rpc::Worker,
    }
}

/// What the gate checks. Built once per run.
#[derive(Debug)]
pub struct Gate {
    token: Option<Token>,
    sessions: Arc<Sessions>,
    /// Largest `SubmitResult` body: every node of the tree with an inline gradient.
    submit_bytes: usize,
    refused: RefusalLog,
    /// Counts refusals by reason (`vae_calls_refused_total`).
    metrics: Metrics,
}

impl Gate {
    pub fn new(
        token: Option<Token>,
        sessions: Arc<Sessions>,
        submit_bytes: usize,
        metrics: Metrics,
    ) -> Self {
        Gate {
            token,
            sessions,
            submit_bytes,
            refused: RefusalLog::default(),
            metrics,
        }
    }

    /// Largest body any call may send.
    pub fn max_request_bytes(&self) -> usize {
        self.submit_bytes.max(SMALL_REQUEST_BYTES)
    }

    /// Admits `request` (adding its [`Caller`] and capping its body) or says why not.
    fn admit(&self, request: &mut http::Request<Body>) -> Result<(), Status> {
        let rpc = rpc(request.uri().path());
        let metadata = tonic::metadata::MetadataMap::from_headers(request.headers().clone());
        if let Some(token) = &self.token
            && !token.presented_in(&metadata)
        {
            self.refused.note(peer(request));
            self.metrics.call_refused(Refusal::Token);
            return Err(Status::unauthenticated(
                "missing or wrong token: give the worker the coordinator's token (--token-file \
                 or VAE_TOKEN)",
            ));
        }
        if rpc == Rpc::Other && request.uri().path().starts_with("/vae.trainer.") {
            self.metrics.call_refused(Refusal::Protocol);
            return Err(Status::failed_precondition(format!(
                "this coordinator speaks protocol {} ({}), the worker called {}: run the same \
                 release on both sides",
                proto::PROTOCOL_VERSION,
                proto::pb::trainer_server::SERVICE_NAME,
                escape(request.uri().path(), 80)
            )));
        }
        if rpc == Rpc::Worker || rpc == Rpc::SubmitResult {
            let caller = WorkerKey::from_metadata(&metadata)
                .and_then(|key| self.sessions.find(&key))
                .ok_or_else(|| {
                    self.metrics.call_refused(Refusal::WorkerKey);
                    Status::not_found(
                        "this call's worker key names no registered worker (declared lost, the \
                         coordinator restarted, or never registered): register again",
                    )
                })?;
            request.extensions_mut().insert(Caller(caller));
        }
        let limit = match rpc {
            Rpc::SubmitResult => self.submit_bytes,
            _ => SMALL_REQUEST_BYTES,
        };
        let body = std::mem::take(request.body_mut());
        let metrics = self.metrics.clone();
        *request.body_mut() =
            Body::new(http_body_util::Limited::new(body, limit).map_err(move |e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    metrics.call_refused(Refusal::TooLarge);
                    Box::new(Status::resource_exhausted(format!(
                        "request body larger than {limit} bytes, the most this call needs"
                    ))) as tonic::codegen::StdError
                } else {
                    e
                }
            }));
        Ok(())
    }
}

fn peer(request: &http::Request<Body>) -> Option<std::net::SocketAddr> {
    let ext = request.extensions();
    ext.get::<TcpConnectInfo>()
        .and_then(TcpConnectInfo::remote_addr)
        .or_else(|| {
            ext.get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(|i| i.get_ref().remote_addr())
        })
}

/// Warns about refused calls at most every few seconds, so a flood cannot flood the log.
#[derive(Debug, Default)]
struct RefusalLog {
    count: AtomicU64,
    last_warning_ms: AtomicU64,
}

impl RefusalLog {
    const EVERY: Duration = Duration::from_secs(10);

    fn note(&self, peer: Option<std::net::SocketAddr>) {
        static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        let now_ms = START.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1;
        let count = self.count.fetch_add(1, Ordering::Relaxed) + 1;
        let last = self.last_warning_ms.load(Ordering::Relaxed);
        let due = last == 0 || now_ms - last >= Self::EVERY.as_millis() as u64;
        if due
            && self
                .last_warning_ms
                .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let peer = peer.map_or_else(|| "an unknown address".into(), |p| p.to_string());
            tracing::warn!(
                "refused a call without the right token from {peer} ({count} refused so far)"
            );
        }
    }
}

/// The tower layer that puts a [`Gate`] in front of the service.
#[derive(Debug, Clone)]
pub struct GateLayer(pub Arc<Gate>);

impl<S> tower_layer::Layer<S> for GateLayer {
    type Service = GateService<S>;
    fn layer(&self, inner: S) -> GateService<S> {
        GateService {
            inner,
            gate: Arc::clone(&self.0),
        }
    }
}

#[derive(Debug, Clone)]
pub struct GateService<S> {
    inner: S,
    gate: Arc<Gate>,
}

impl<S> tower_service::Service<http::Request<Body>> for GateService<S>
where
    S: tower_service::Service<http::Request<Body>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = tonic::codegen::BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        match self.gate.admit(&mut request) {
            Ok(()) => Box::pin(self.inner.call(request)),
            Err(status) => Box::pin(std::future::ready(Ok(status.into_http()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_are_told_apart_by_path() {
        let path = |m: &str| format!("/{}/{m}", proto::pb::trainer_server::SERVICE_NAME);
        assert_eq!(rpc(&path("Register")), Rpc::Register);
        assert_eq!(rpc(&path("SubmitResult")), Rpc::SubmitResult);
        assert_eq!(rpc(&path("FetchShard")), Rpc::Worker);
        assert_eq!(rpc(&path("Heartbeat")), Rpc::Worker);
        assert_eq!(rpc("/vae.trainer.v2.Trainer/Register"), Rpc::Other);
        assert_eq!(rpc("/grpc.health.v1.Health/Check"), Rpc::Other);
    }
}

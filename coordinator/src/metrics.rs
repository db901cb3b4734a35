//! Prometheus metrics of a run: the registry, its metric families, and the small HTTP server that
//! serves them at `GET /metrics` on `--metrics-addr`, in the Prometheus text format (0.0.4).
//!
//! [`Metrics`] is a cheap handle (one `Arc`) that the driver, the gRPC service and the gate update
//! as things happen. Counters and gauges are atomics; a histogram observation takes the
//! histogram's own uncontended lock (once per step, or once per worker result), and the
//! per-worker family is looked up under a read lock once per accepted result. No call takes a
//! lock that another call holds for long, and nothing is computed at scrape time but the
//! checkpoint age.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, header};
use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use proto::messages::TensorRef;
use tokio::net::TcpListener;

use crate::error::{Error, Result};
use crate::outputs::EpochMetrics;
use crate::state::WorkerId;

/// The moving window of `vae_samples_per_second`: steps applied in the last this long.
pub const THROUGHPUT_WINDOW: Duration = Duration::from_secs(10);

/// Concurrent scrape connections; more are closed on accept (a scraper needs one).
const MAX_CONNECTIONS: usize = 16;

/// A connection that has not sent a request's headers within this long is closed.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the gate refused a call (`vae_calls_refused_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Missing or wrong token.
    Token,
    /// A worker call whose key names no registered worker.
    WorkerKey,
    /// A call of another protocol version.
    Protocol,
    /// A request body beyond its call's cap.
    TooLarge,
}

impl Refusal {
    const ALL: [Refusal; 4] = [
        Refusal::Token,
        Refusal::WorkerKey,
        Refusal::Protocol,
        Refusal::TooLarge,
    ];

    fn label(self) -> &'static str {
        match self {
            Refusal::Token => "token",
            Refusal::WorkerKey => "worker_key",
            Refusal::Protocol => "protocol",
            Refusal::TooLarge => "too_large",
        }
    }
}

type Label = [(&'static str, &'static str); 1];
type WorkerLabel = [(&'static str, u64); 1];
type FloatGauge = Gauge<f64, AtomicU64>;

/// Counters of tensor bytes, by the path they took.
#[derive(Debug)]
struct ByPath {
    grpc: Counter,
    shared_memory: Counter,
}

impl ByPath {
    fn new(family: &Family<Label, Counter>) -> Self {
        ByPath {
            grpc: family.get_or_create_owned(&[("transport", "grpc")]),
            shared_memory: family.get_or_create_owned(&[("transport", "shared_memory")]),
        }
    }

    /// Counts the bytes of the values `tensor` carries (inline: its encoded bytes; shared
    /// memory: 4 bytes a value, read from or written to the shared file).
    fn count(&self, tensor: &TensorRef) {
        match tensor {
            TensorRef::Inline(bytes) => self.grpc.inc_by(bytes.len() as u64),
            TensorRef::Shared { len, .. } | TensorRef::ParameterFile { len, .. } => {
                self.shared_memory.inc_by(len.saturating_mul(4))
            }
        };
    }
}

#[derive(Debug)]
struct Inner {
    registry: Registry,
    steps: Counter,
    epoch: Gauge,
    examples: Counter,
    samples_per_second: FloatGauge,
    step_elbo: FloatGauge,
    train_elbo: FloatGauge,
    heldout_elbo: FloatGauge,
    workers: Gauge,
    workers_lost: Counter,
    workers_quarantined: Counter,
    nodes_backed_up: Counter,
    results_rejected: Counter,
    received: ByPath,
    sent: ByPath,
    shard_bytes: Counter,
    step_duration: Histogram,
    node_duration: Family<WorkerLabel, Histogram, fn() -> Histogram>,
    refused: [Counter; Refusal::ALL.len()],
    checkpoint_age: FloatGauge,
    /// When this process started serving; checkpoint instants are counted from here.
    started: Instant,
    /// Milliseconds after `started` of the last checkpoint written (`u64::MAX`: none yet).
    last_checkpoint_ms: AtomicU64,
}

/// Time buckets from 1 ms to about 65 s, doubling.
fn duration_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.001, 2.0, 17)
}

fn node_histogram() -> Histogram {
    Histogram::new(duration_buckets())
}

/// The number of a worker within this coordinator process (its id without the incarnation
/// prefix): 1, 2, ... in order of registration.
fn worker_number(worker: WorkerId) -> u64 {
    worker.0 & ((1 << 40) - 1)
}

/// The run's metrics. Clones share them.
#[derive(Debug, Clone)]
pub struct Metrics(Arc<Inner>);

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut r = Registry::default();
        let steps = Counter::default();
        r.register(
            "vae_steps",
            "Global training steps applied (resumed runs start from the checkpoint's step)",
            steps.clone(),
        );
        let epoch = Gauge::default();
        r.register(
            "vae_epoch",
            "Epochs completed (the epoch in progress is this plus one)",
            epoch.clone(),
        );
        let examples = Counter::default();
        r.register(
            "vae_examples",
            "Training examples processed (resumed runs start from the checkpoint's count)",
            examples.clone(),
        );
        let samples_per_second = FloatGauge::default();
        r.register(
            "vae_samples_per_second",
            "Training examples per second of step time, over the steps applied in the last 10 \
             seconds (held-out evaluation excluded)",
            samples_per_second.clone(),
        );
        let nan = || {
            let g = FloatGauge::default();
            g.set(f64::NAN);
            g
        };
        let (step_elbo, train_elbo, heldout_elbo) = (nan(), nan(), nan());
        let nats = || Unit::Other("nats".into());
        r.register_with_unit(
            "vae_step_elbo",
            "ELBO per example of the last step's batch, in nats (NaN before the first step)",
            nats(),
            step_elbo.clone(),
        );
        r.register_with_unit(
            "vae_train_elbo",
            "Training ELBO per example over the last completed epoch, in nats (NaN before the \
             first)",
            nats(),
            train_elbo.clone(),
        );
        r.register_with_unit(
            "vae_heldout_elbo",
            "Held-out ELBO per example after the last completed epoch, in nats (NaN before the \
             first)",
            nats(),
            heldout_elbo.clone(),
        );
        let workers = Gauge::default();
        r.register(
            "vae_workers_registered",
            "Workers registered and alive",
            workers.clone(),
        );
        let workers_lost = Counter::default();
        r.register(
            "vae_workers_lost",
            "Workers declared lost (silent, failing or removed)",
            workers_lost.clone(),
        );
        let workers_quarantined = Counter::default();
        r.register(
            "vae_workers_quarantined",
            "Workers quarantined for sending wrong results (also counted as lost)",
            workers_quarantined.clone(),
        );
        let nodes_backed_up = Counter::default();
        r.register(
            "vae_nodes_backed_up",
            "Tree nodes given to a second worker because the first was too slow",
            nodes_backed_up.clone(),
        );
        let results_rejected = Counter::default();
        r.register(
            "vae_results_rejected",
            "Node results rejected (wrong length, non-finite values, wrong example count)",
            results_rejected.clone(),
        );
        let received = Family::<Label, Counter>::default();
        r.register_with_unit(
            "vae_tensor_received",
            "Gradient bytes received from workers, by transport (shared_memory: read from the \
             shared file)",
            Unit::Bytes,
            received.clone(),
        );
        let sent = Family::<Label, Counter>::default();
        r.register_with_unit(
            "vae_tensor_sent",
            "Parameter bytes handed to workers with their tasks, by transport (shared_memory: \
             the worker reads them from the shared file)",
            Unit::Bytes,
            sent.clone(),
        );
        let shard_bytes = Counter::default();
        r.register_with_unit(
            "vae_shard_sent",
            "Training data bytes handed to workers (shard downloads, streamed or as shared-memory files)",
            Unit::Bytes,
            shard_bytes.clone(),
        );
        let step_duration = Histogram::new(duration_buckets());
        r.register_with_unit(
            "vae_step_duration",
            "Wall time of a training step, from its start to its update applied",
            Unit::Seconds,
            step_duration.clone(),
        );
        let node_duration = Family::new_with_constructor(node_histogram as fn() -> Histogram);
        r.register_with_unit(
            "vae_node_duration",
            "Time a worker reports computing its tree nodes of one step (CPU time of its pool \
             divided by its threads), per accepted result; worker is its number in this \
             coordinator, series of lost workers are dropped",
            Unit::Seconds,
            node_duration.clone(),
        );
        let refused_family = Family::<Label, Counter>::default();
        r.register(
            "vae_calls_refused",
            "Calls refused by the gate before their body was read, by reason",
            refused_family.clone(),
        );
        let refused =
            Refusal::ALL.map(|why| refused_family.get_or_create_owned(&[("reason", why.label())]));
        let checkpoint_age = FloatGauge::default();
        r.register_with_unit(
            "vae_checkpoint_age",
            "Time since the last checkpoint was written (since the coordinator started, before \
             its first)",
            Unit::Seconds,
            checkpoint_age.clone(),
        );
        Metrics(Arc::new(Inner {
            registry: r,
            steps,
            epoch,
            examples,
            samples_per_second,
            step_elbo,
            train_elbo,
            heldout_elbo,
            workers,
            workers_lost,
            workers_quarantined,
            nodes_backed_up,
            results_rejected,
            received: ByPath::new(&received),
            sent: ByPath::new(&sent),
            shard_bytes,
            step_duration,
            node_duration,
            refused,
            checkpoint_age,
            started: Instant::now(),
            last_checkpoint_ms: AtomicU64::new(u64::MAX),
        }))
    }

    /// Where a (possibly resumed) run starts: `last` is the last epoch's line of metrics.jsonl.
    pub fn start_at(
        &self,
        global_step: u64,
        epoch: u64,
        examples: u64,
        last: Option<&EpochMetrics>,
    ) {
        self.0.steps.inc_by(global_step);
        self.0.epoch.set(epoch as i64);
        self.0.examples.inc_by(examples);
        if let Some(m) = last {
            self.0.train_elbo.set(m.train_elbo);
            self.0.heldout_elbo.set(m.heldout_elbo);
        }
    }

    pub fn worker_joined(&self) {
        self.0.workers.inc();
    }

    pub fn worker_lost(&self, worker: WorkerId) {
        self.0.workers.dec();
        self.0.workers_lost.inc();
        self.0
            .node_duration
            .remove(&[("worker", worker_number(worker))]);
    }

    /// A worker was quarantined for wrong results (it is counted as lost as well).
    pub fn worker_quarantined(&self) {
        self.0.workers_quarantined.inc();
    }

    pub fn node_backed_up(&self) {
        self.0.nodes_backed_up.inc();
    }

    pub fn result_rejected(&self) {
        self.0.results_rejected.inc();
    }

    /// A step's update was applied: `elbo` per example of its batch, `seconds` its wall time,
    /// `samples_per_second` from the driver's [`Throughput`].
    pub fn step_applied(&self, examples: u64, elbo: f64, seconds: f64, samples_per_second: f64) {
        self.0.steps.inc();
        self.0.examples.inc_by(examples);
        self.0.step_elbo.set(elbo);
        self.0.step_duration.observe(seconds);
        self.0.samples_per_second.set(samples_per_second);
    }

    pub fn epoch_ended(&self, m: &EpochMetrics) {
        self.0.epoch.set(m.epoch as i64);
        self.0.train_elbo.set(m.train_elbo);
        self.0.heldout_elbo.set(m.heldout_elbo);
    }

    pub fn checkpoint_written(&self) {
        let ms = self.0.started.elapsed().as_millis() as u64;
        self.0.last_checkpoint_ms.store(ms, Ordering::Relaxed);
    }

    /// A task's parameters handed to a worker.
    pub fn params_sent(&self, params: &TensorRef) {
        self.0.sent.count(params);
    }

    /// A result's gradient, as it arrived (before it is read).
    pub fn gradient_received(&self, grad: &TensorRef) {
        self.0.received.count(grad);
    }

    pub fn shard_bytes_sent(&self, bytes: u64) {
        self.0.shard_bytes.inc_by(bytes);
    }

    /// `worker`'s result for a step was accepted; it reports `seconds` of computing.
    pub fn node_computed(&self, worker: WorkerId, seconds: f64) {
        self.0
            .node_duration
            .get_or_create(&[("worker", worker_number(worker))])
            .observe(seconds);
    }

    pub fn call_refused(&self, why: Refusal) {
        self.0.refused[why as usize].inc();
    }

    /// The text exposition of every family, with the checkpoint age as of now.
    pub fn encode(&self) -> String {
        let ms = self.0.last_checkpoint_ms.load(Ordering::Relaxed);
        let since = if ms == u64::MAX {
            self.0.started
        } else {
            self.0.started + Duration::from_millis(ms)
        };
        self.0.checkpoint_age.set(since.elapsed().as_secs_f64());
        let mut text = String::with_capacity(8 << 10);
        prometheus_text::encode(&mut text, &self.0.registry).expect("writing to a String");
        text
    }

    fn respond(&self, request: &Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
        let reply = |status: StatusCode, kind: &'static str, body: String| {
            let mut response = Response::new(Full::new(Bytes::from(body)));
            *response.status_mut() = status;
            response
                .headers_mut()
                .insert(header::CONTENT_TYPE, header::HeaderValue::from_static(kind));
            response
        };
        let plain = "text/plain; charset=utf-8";
        match (request.method(), request.uri().path()) {
            (&Method::GET | &Method::HEAD, "/metrics") => {
                reply(StatusCode::OK, prometheus_text::CONTENT_TYPE, self.encode())
            }
            (&Method::GET | &Method::HEAD, "/") => reply(
                StatusCode::OK,
                plain,
                "vae coordinator: metrics at /metrics\n".into(),
            ),
            (_, "/" | "/metrics") => {
                let mut r = reply(
                    StatusCode::METHOD_NOT_ALLOWED,
                    plain,
                    "only GET is served here\n".into(),
                );
                r.headers_mut()
                    .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
                r
            }
            _ => reply(
                StatusCode::NOT_FOUND,
                plain,
                "not found: metrics are at /metrics\n".into(),
            ),
        }
    }
}

/// Training examples per second of step time over the steps applied in the last
/// [`THROUGHPUT_WINDOW`] of wall time (at least the last step), so pauses between steps
/// (held-out evaluation, waiting for workers) do not count. Owned by the driver.
#[derive(Debug, Default)]
pub struct Throughput {
    steps: VecDeque<(Instant, u64, f64)>,
    examples: u64,
    seconds: f64,
}

impl Throughput {
    /// Adds a step applied at `now`; returns the rate over the window.
    pub fn add(&mut self, now: Instant, examples: u64, seconds: f64) -> f64 {
        self.steps.push_back((now, examples, seconds));
        self.examples += examples;
        self.seconds += seconds;
        while self.steps.len() > 1
            && now.saturating_duration_since(self.steps[0].0) > THROUGHPUT_WINDOW
        {
            let (_, e, s) = self.steps.pop_front().expect("more than one step");
            self.examples -= e;
            self.seconds -= s;
        }
        if self.steps.len() == 1 {
            // No drift from the running sums.
            self.seconds = seconds;
        }
        self.examples as f64 / self.seconds.max(1e-9)
    }
}

/// Binds the metrics listener, with an error that names the flag.
pub async fn bind(addr: &str) -> Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| {
        Error::Io(format!(
            "cannot serve metrics on {addr}: {e}; choose another address with --metrics-addr \
             (port 0 picks a free one)"
        ))
    })
}

/// Serves `GET /metrics` on `listener` until the task is aborted: HTTP/1.1, a connection at a
/// time per scraper, at most [`MAX_CONNECTIONS`] at once.
pub async fn serve(listener: TcpListener, metrics: Metrics) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!("metrics endpoint: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            tracing::debug!("metrics endpoint: {MAX_CONNECTIONS} connections open, closing {peer}");
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let response = metrics.respond(&request);
                async move { Ok::<_, Infallible>(response) }
            });
            let served = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
            if let Err(e) = served {
                tracing::debug!("metrics endpoint: connection from {peer}: {e}");
            }
            drop(slot);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn every_family_is_exposed_with_its_type() {
        let m = Metrics::new();
        m.start_at(10, 1, 640, None);
        m.worker_joined();
        m.worker_joined();
        m.worker_lost(WorkerId(7 << 40 | 2));
        m.step_applied(64, -250.5, 0.004, 16000.0);
        m.node_computed(WorkerId(7 << 40 | 1), 0.003);
        m.params_sent(&TensorRef::Inline(Bytes::from(vec![0u8; 400])));
        m.params_sent(&TensorRef::ParameterFile { slot: 1, len: 100 });
        m.gradient_received(&TensorRef::Shared { offset: 0, len: 25 });
        m.call_refused(Refusal::Token);
        m.call_refused(Refusal::TooLarge);
        m.call_refused(Refusal::TooLarge);
        let text = m.encode();
        for line in [
            "# TYPE vae_steps_total counter",
            "vae_steps_total 11",
            "vae_epoch 1",
            "vae_examples_total 704",
            "vae_samples_per_second 16000.0",
            "vae_step_elbo_nats -250.5",
            "vae_train_elbo_nats NaN",
            "# TYPE vae_heldout_elbo_nats gauge",
            "vae_workers_registered 1",
            "vae_workers_lost_total 1",
            "vae_workers_quarantined_total 0",
            "vae_results_rejected_total 0",
            "vae_nodes_backed_up_total 0",
            "vae_tensor_sent_bytes_total{transport=\"grpc\"} 400",
            "vae_tensor_sent_bytes_total{transport=\"shared_memory\"} 400",
            "vae_tensor_received_bytes_total{transport=\"shared_memory\"} 100",
            "vae_tensor_received_bytes_total{transport=\"grpc\"} 0",
            "vae_shard_sent_bytes_total 0",
            "# TYPE vae_step_duration_seconds histogram",
            "vae_step_duration_seconds_count 1",
            "vae_node_duration_seconds_count{worker=\"1\"} 1",
            "vae_calls_refused_total{reason=\"token\"} 1",
            "vae_calls_refused_total{reason=\"too_large\"} 2",
            "vae_calls_refused_total{reason=\"worker_key\"} 0",
            "# TYPE vae_checkpoint_age_seconds gauge",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "no line `{line}` in:\n{text}"
            );
        }
        // A lost worker's node-time series goes with it.
        m.worker_lost(WorkerId(7 << 40 | 1));
        assert!(!m.encode().contains("worker=\"1\""));
    }

    #[test]
    fn checkpoint_age_counts_from_the_last_checkpoint() {
        let m = Metrics::new();
        std::thread::sleep(Duration::from_millis(30));
        let age = |m: &Metrics| {
            let text = m.encode();
            let line = text
                .lines()
                .find(|l| l.starts_with("vae_checkpoint_age_seconds "))
                .unwrap()
                .to_string();
            line.rsplit(' ').next().unwrap().parse::<f64>().unwrap()
        };
        assert!(age(&m) >= 0.03);
        m.checkpoint_written();
        assert!(age(&m) < 0.03);
    }

    #[test]
    fn throughput_is_over_the_window_of_recent_steps() {
        let mut t = Throughput::default();
        let t0 = Instant::now();
        assert_eq!(t.add(t0, 100, 0.5), 200.0);
        assert_eq!(t.add(t0 + Duration::from_secs(1), 100, 1.5), 100.0);
        // Eleven seconds later both earlier steps left the window; the pause itself never counts.
        let later = t0 + Duration::from_secs(12);
        assert_eq!(t.add(later, 300, 1.0), 300.0);
        assert_eq!(t.steps.len(), 1);
    }

    #[tokio::test]
    async fn the_endpoint_serves_the_text_format() {
        let listener = bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let m = Metrics::new();
        m.step_applied(64, -200.0, 0.01, 6400.0);
        let server = tokio::spawn(serve(listener, m));
        let get = |path: &'static str| async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            s.write_all(request.as_bytes()).await.unwrap();
            let mut response = String::new();
            s.read_to_string(&mut response).await.unwrap();
            response
        };
        let ok = get("/metrics").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(
            ok.contains("content-type: text/plain; version=0.0.4; charset=utf-8"),
            "{ok}"
        );
        assert!(ok.contains("\nvae_steps_total 1\n"), "{ok}");
        let missing = get("/other").await;
        assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
        server.abort();
    }
}

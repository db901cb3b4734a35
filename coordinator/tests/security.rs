//! The trust boundary, attacked as a client on the network would (docs/security.md): every call
//! needs the token, every call after registration the worker's own key, shards go only to the
//! worker they were given to, floods stay within a memory bound, and TLS refuses the wrong
//! certificates. The real binaries on 127.0.0.1; raw gRPC clients built from `trainer.proto`.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{Coordinator, SMALL_RUN, finish_worker, summary, worker};
use proto::credentials::{Credentials, Token, WorkerKey};
use proto::messages::{Registered, Registration};
use proto::pb;
use proto::pb::trainer_client::TrainerClient;
use tonic::Code;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

type Client = TrainerClient<InterceptedService<Channel, Credentials>>;

const TOKEN: &str = "s3cret-token";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

async fn channel(addr: &str) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("connect")
}

fn client(channel: Channel, credentials: Credentials) -> Client {
    TrainerClient::with_interceptor(channel, credentials)
        .max_encoding_message_size(256 << 20)
        .max_decoding_message_size(256 << 20)
}

fn token() -> Option<Token> {
    Some(Token::new(TOKEN).unwrap())
}

fn registration(name: String) -> pb::RegisterRequest {
    Registration {
        protocol_version: proto::PROTOCOL_VERSION,
        name,
        threads: 1,
        build: "test".into(),
    }
    .into()
}

/// Registers a client that never computes; returns its key.
async fn register(channel: &Channel) -> WorkerKey {
    let reply = client(channel.clone(), Credentials::new(token()))
        .register(registration("raw".into()))
        .await
        .expect("register");
    Registered::try_from(reply.into_inner()).unwrap().worker_key
}

/// The status code of every per-worker call made with `credentials`.
async fn codes_of_every_worker_call(channel: &Channel, credentials: Credentials) -> Vec<Code> {
    let mut c = client(channel.clone(), credentials);
    let code = |r: Result<tonic::Code, tonic::Status>| match r {
        Ok(code) => code,
        Err(status) => status.code(),
    };
    vec![
        code(c.next_task(pb::NextTaskRequest {}).await.map(|_| Code::Ok)),
        code(c.heartbeat(pb::HeartbeatRequest {}).await.map(|_| Code::Ok)),
        code(
            c.submit_result(pb::SubmitRequest {
                step: 0,
                results: vec![],
                compute_seconds: 0.0,
            })
            .await
            .map(|_| Code::Ok),
        ),
        code(
            c.fetch_shard(pb::FetchShardRequest { shard: 0 })
                .await
                .map(|_| Code::Ok),
        ),
        code(
            c.attach_shared_memory(pb::AttachRequest {
                probe: vec![0; 16].into(),
            })
            .await
            .map(|_| Code::Ok),
        ),
    ]
}

fn start(out: &Path, extra: &[&str]) -> Coordinator {
    let mut args = SMALL_RUN.to_vec();
    args.extend_from_slice(&["--token", TOKEN]);
    args.extend_from_slice(extra);
    Coordinator::start(out, &args)
}

#[test]
fn shards_go_only_to_registered_workers_and_only_their_own() {
    let out = tempfile::tempdir().unwrap();
    let c = start(out.path(), &["--workers", "2"]);
    runtime().block_on(async {
        let ch = channel(&c.addr).await;
        // No credentials at all: the data stays home.
        let mut anonymous = client(ch.clone(), Credentials::new(None));
        let e = anonymous
            .fetch_shard(pb::FetchShardRequest { shard: 0 })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
        // The token but no worker key.
        let mut keyless = client(ch.clone(), Credentials::new(token()));
        let e = keyless
            .fetch_shard(pb::FetchShardRequest { shard: 0 })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound, "{e:?}");

        // Two registered workers split the 8 shards 4/4; each may fetch only its own.
        let a = register(&ch).await;
        let b = register(&ch).await;
        let mut own = 0;
        for (key, other) in [(a, b), (b, a)] {
            let mut c = client(ch.clone(), Credentials::new(token()).with_key(key));
            for shard in 0..8 {
                match c.fetch_shard(pb::FetchShardRequest { shard }).await {
                    Ok(stream) => {
                        let mut stream = stream.into_inner();
                        while stream.message().await.unwrap().is_some() {}
                        own += 1;
                    }
                    Err(e) => assert_eq!(e.code(), Code::PermissionDenied, "{e:?}"),
                }
            }
            let _ = other;
        }
        assert_eq!(own, 8, "each shard goes to exactly one of the two workers");
        let mut c = client(ch.clone(), Credentials::new(token()).with_key(a));
        let e = c
            .fetch_shard(pb::FetchShardRequest { shard: 99 })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    });
}

#[test]
fn forged_and_stale_worker_keys_are_refused_on_every_call() {
    let out = tempfile::tempdir().unwrap();
    let reference_out = tempfile::tempdir().unwrap();
    let reference = common::train(reference_out.path(), 1, &[]);
    let mut c = start(out.path(), &["--workers", "1", "--worker-timeout", "1"]);
    runtime().block_on(async {
        let ch = channel(&c.addr).await;
        let forged = Credentials::new(token()).with_key(WorkerKey::random());
        let codes = codes_of_every_worker_call(&ch, forged).await;
        assert!(codes.iter().all(|&c| c == Code::NotFound), "{codes:?}");
        // A real key without the token.
        let key = register(&ch).await;
        let codes = codes_of_every_worker_call(&ch, Credentials::new(None).with_key(key)).await;
        assert!(
            codes.iter().all(|&c| c == Code::Unauthenticated),
            "{codes:?}"
        );
        // The raw client never heartbeats: declared lost, its key goes stale.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let codes =
                codes_of_every_worker_call(&ch, Credentials::new(token()).with_key(key)).await;
            if codes.iter().all(|&c| c == Code::NotFound) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the key never went stale: {codes:?}"
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    });
    assert!(
        c.wait_log("lost", Duration::from_secs(5)),
        "{}",
        c.log.join("\n")
    );
    // None of it touched the run: an honest worker trains it to the reference parameters.
    let honest = worker(&c.addr, &["--token", TOKEN]);
    let (ok, log) = c.finish(Duration::from_secs(240));
    assert!(ok, "{log}");
    assert!(finish_worker(honest, Duration::from_secs(30)).0.success());
    assert_eq!(summary(out.path())["fingerprint"], reference.as_str());
}

fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmHWM in /proc/PID/status");
    kib / 1024.0
}

/// Peak memory of the coordinator under attack, in MiB. The bound: per-call body caps (64 KiB,
/// or one gradient per shard for SubmitResult), 16 streams per connection, connection windows,
/// and `--max-connections`.
const FLOOD_PEAK_RSS_MIB: f64 = 160.0;

#[test]
fn floods_of_oversized_parallel_and_silent_requests_leave_the_run_alive_and_bounded() {
    let out = tempfile::tempdir().unwrap();
    let mut c = start(
        out.path(),
        &[
            "--workers",
            "1",
            "--idle-timeout",
            "2",
            "--max-connections",
            "64",
            "--epochs",
            "3",
        ],
    );
    let pid = c.child.id();
    let before = peak_rss_mib(pid);
    let honest = runtime().block_on(async {
        let mut calls = tokio::task::JoinSet::new();
        for _ in 0..8 {
            let ch = channel(&c.addr).await;
            for i in 0..8 {
                let ch = ch.clone();
                calls.spawn(async move {
                    match i % 4 {
                        // A huge name, with the token.
                        0 => client(ch, Credentials::new(token()))
                            .register(registration("x".repeat(4 << 20)))
                            .await
                            .map(|_| ()),
                        // A huge result without the token.
                        1 => client(ch, Credentials::new(None))
                            .submit_result(big_submit(32 << 20))
                            .await
                            .map(|_| ()),
                        // A huge result with the token but a forged key.
                        2 => client(ch, Credentials::new(token()).with_key(WorkerKey::random()))
                            .submit_result(big_submit(32 << 20))
                            .await
                            .map(|_| ()),
                        // A huge result from a registered worker: over the cap for this model.
                        _ => {
                            let key = register(&ch).await;
                            client(ch, Credentials::new(token()).with_key(key))
                                .submit_result(big_submit(64 << 20))
                                .await
                                .map(|_| ())
                        }
                    }
                });
            }
        }
        let mut codes = Vec::new();
        while let Some(r) = calls.join_next().await {
            codes.push(r.unwrap().map_or_else(|s| s.code(), |_| Code::Ok));
        }
        assert!(
            codes.iter().all(|&c| c != Code::Ok),
            "every flooding call is refused: {codes:?}"
        );

        // Connections that never say anything take slots until the idle timeout closes them.
        let mut silent = Vec::new();
        for _ in 0..100 {
            if let Ok(s) = tokio::net::TcpStream::connect(&c.addr).await {
                silent.push(s);
            }
        }
        tokio::time::sleep(Duration::from_secs(4)).await;
        let mut closed = 0;
        for s in &mut silent {
            // The server's SETTINGS frame may come first; then the end of the stream.
            let mut rest = Vec::new();
            use tokio::io::AsyncReadExt;
            if let Ok(Ok(_) | Err(_)) =
                tokio::time::timeout(Duration::from_millis(500), s.read_to_end(&mut rest)).await
            {
                closed += 1;
            }
        }
        assert_eq!(closed, silent.len(), "silent connections are closed");
        assert!(
            c.child.try_wait().unwrap().is_none(),
            "closed by the idle timeout, not by the run's end"
        );
        // The honest worker joins only now: this small run trains in about a second, and must
        // not end (closing the port) while the checks above still need it.
        worker(&c.addr, &["--token", TOKEN])
    });
    let peak = peak_rss_mib(pid);
    eprintln!("coordinator peak RSS: {before:.0} MiB at start, {peak:.0} MiB after the flood");
    assert!(
        peak < FLOOD_PEAK_RSS_MIB,
        "peak RSS {peak:.0} MiB exceeds {FLOOD_PEAK_RSS_MIB} MiB"
    );
    assert!(
        c.wait_log(
            "refused a call without the right token",
            Duration::from_secs(1)
        ),
        "{}",
        c.log.join("\n")
    );
    let (ok, log) = c.finish(Duration::from_secs(240));
    assert!(ok, "the run survives the flood: {log}");
    assert!(finish_worker(honest, Duration::from_secs(30)).0.success());
}

fn big_submit(bytes: usize) -> pb::SubmitRequest {
    pb::SubmitRequest {
        step: 0,
        results: vec![pb::NodeResult {
            lo: 0,
            hi: 1,
            grad: Some(pb::TensorRef {
                location: Some(pb::tensor_ref::Location::Inline(vec![0u8; bytes].into())),
            }),
            ..Default::default()
        }],
        compute_seconds: 0.0,
    }
}

#[test]
fn exposed_listeners_need_a_token_tls_or_insecure() {
    let out = tempfile::tempdir().unwrap();
    let refused = std::process::Command::new(common::coordinator_bin())
        .args(["--listen", "0.0.0.0:0", "--out"])
        .arg(out.path())
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(2));
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("neither a token nor TLS") && err.contains("--insecure"),
        "{err}"
    );
    assert!(
        std::fs::read_dir(out.path()).unwrap().next().is_none(),
        "nothing written"
    );

    let token_file = out.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    for extra in [
        vec!["--insecure"],
        vec!["--token-file", token_file.to_str().unwrap()],
    ] {
        let mut child = std::process::Command::new(common::coordinator_bin())
            .args(["--listen", "0.0.0.0:0", "--out"])
            .arg(out.path().join("run"))
            .args(SMALL_RUN)
            .args(&extra)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        use std::io::BufRead;
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(
            line.starts_with("coordinator listening on 0.0.0.0:"),
            "{extra:?}: {line}"
        );
        child.kill().unwrap();
        child.wait().unwrap();
    }
}

/// A CA and certificates it signs, written as PEM files.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        let pki = Pki {
            dir: tempfile::tempdir().unwrap(),
        };
        let (ca, ca_key) = pki.authority("ca");
        pki.leaf("server", &ca, &ca_key);
        pki.leaf("client", &ca, &ca_key);
        let (rogue, rogue_key) = pki.authority("rogue-ca");
        pki.leaf("rogue-client", &rogue, &rogue_key);
        pki
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).to_str().unwrap().to_string()
    }

    fn authority(&self, name: &str) -> (rcgen::CertificateParams, rcgen::KeyPair) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let cert = params.self_signed(&key).unwrap();
        std::fs::write(self.path(&format!("{name}.pem")), cert.pem()).unwrap();
        (params, key)
    }

    fn leaf(&self, name: &str, ca: &rcgen::CertificateParams, ca_key: &rcgen::KeyPair) {
        let key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
        let issuer = rcgen::Issuer::from_params(ca, ca_key);
        let cert = params.signed_by(&key, &issuer).unwrap();
        std::fs::write(self.path(&format!("{name}.pem")), cert.pem()).unwrap();
        std::fs::write(self.path(&format!("{name}.key")), key.serialize_pem()).unwrap();
    }
}

#[test]
fn mutual_tls_trains_and_refuses_the_wrong_ca_or_no_certificate() {
    let pki = Pki::new();
    let out = tempfile::tempdir().unwrap();
    let (cert, key, ca) = (
        pki.path("server.pem"),
        pki.path("server.key"),
        pki.path("ca.pem"),
    );
    let mut args = SMALL_RUN.to_vec();
    args.extend_from_slice(&[
        "--workers",
        "1",
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--tls-ca",
        &ca,
    ]);
    let c = Coordinator::start(out.path(), &args);
    // `worker()` passes --retry-for 20; a later flag overrides it.
    let quick = ["--retry-for", "2"];
    let (client_cert, client_key) = (pki.path("client.pem"), pki.path("client.key"));
    let refused = |extra: &[&str]| {
        let mut args = quick.to_vec();
        args.extend_from_slice(extra);
        let (status, err) = finish_worker(worker(&c.addr, &args), Duration::from_secs(30));
        assert!(!status.success(), "{extra:?} must be refused");
        err
    };
    // The coordinator's certificate is not signed by the CA this worker trusts.
    let err = refused(&[
        "--tls-ca",
        &pki.path("rogue-ca.pem"),
        "--tls-cert",
        &client_cert,
        "--tls-key",
        &client_key,
    ]);
    assert!(
        err.contains("certificate") || err.contains("Unknown"),
        "{err}"
    );
    // No client certificate under mutual TLS.
    refused(&["--tls-ca", &ca]);
    // A client certificate from another CA.
    refused(&[
        "--tls-ca",
        &ca,
        "--tls-cert",
        &pki.path("rogue-client.pem"),
        "--tls-key",
        &pki.path("rogue-client.key"),
    ]);
    // Plaintext to a TLS listener.
    refused(&[]);
    // The right certificates train.
    let good = worker(
        &c.addr,
        &[
            "--tls-ca",
            &ca,
            "--tls-cert",
            &client_cert,
            "--tls-key",
            &client_key,
        ],
    );
    let (ok, log) = c.finish(Duration::from_secs(240));
    assert!(ok, "{log}");
    assert!(log.contains("TLS with"), "{log}");
    let (status, err) = finish_worker(good, Duration::from_secs(30));
    assert!(status.success(), "{err}");
}

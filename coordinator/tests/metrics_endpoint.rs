//! `--metrics-addr`: the Prometheus endpoint of a running training, scraped directly, checked by
//! `promtool check metrics`, and scraped by a real Prometheus server whose HTTP API then answers
//! queries for samples/s and the step count.
//!
//! `promtool` and `prometheus` come from Debian's `prometheus` package (`.ci/run` installs it).
//! Without them these tests fail with a message saying so; `VAE_SKIP_PROMETHEUS=1` skips the parts
//! that need them on purpose (each prints SKIPPED).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Coordinator, SMALL_RUN, worker};

/// Every family the endpoint serves, with its type.
const FAMILIES: &[(&str, &str)] = &[
    ("vae_steps_total", "counter"),
    ("vae_epoch", "gauge"),
    ("vae_examples_total", "counter"),
    ("vae_samples_per_second", "gauge"),
    ("vae_step_elbo_nats", "gauge"),
    ("vae_train_elbo_nats", "gauge"),
    ("vae_heldout_elbo_nats", "gauge"),
    ("vae_workers_registered", "gauge"),
    ("vae_workers_lost_total", "counter"),
    ("vae_workers_quarantined_total", "counter"),
    ("vae_nodes_backed_up_total", "counter"),
    ("vae_results_rejected_total", "counter"),
    ("vae_tensor_received_bytes_total", "counter"),
    ("vae_tensor_sent_bytes_total", "counter"),
    ("vae_shard_sent_bytes_total", "counter"),
    ("vae_step_duration_seconds", "histogram"),
    ("vae_node_duration_seconds", "histogram"),
    ("vae_calls_refused_total", "counter"),
    ("vae_checkpoint_age_seconds", "gauge"),
];

/// A training that runs until the test kills it: the small run with many epochs and one worker
/// process, and the metrics endpoint on a free port. Returns the coordinator, its worker and the
/// endpoint's address.
fn running_training(out: &Path) -> (Coordinator, Killed, String) {
    let mut args = SMALL_RUN.to_vec();
    args.extend_from_slice(&[
        "--epochs",
        "10000",
        "--iw-samples",
        "0",
        "--metrics-addr",
        "127.0.0.1:0",
    ]);
    let mut c = Coordinator::start(out, &args);
    let line = c
        .wait_stdout(
            |l| l.starts_with("metrics listening on "),
            Duration::from_secs(30),
        )
        .unwrap_or_else(|| {
            panic!(
                "the coordinator did not print its metrics address; log:\n{}",
                c.log.join("\n")
            )
        });
    let addr = line
        .trim_start_matches("metrics listening on ")
        .trim()
        .to_string();
    let w = Killed(worker(&c.addr, &[]));
    (c, w, addr)
}

/// A child process killed when the test ends, however it ends.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `GET http://{addr}{path}`: the status code and the body.
fn get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    s.read_to_string(&mut response)?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    Ok((status, body))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}

fn scrape(addr: &str) -> String {
    let (status, body) = get(addr, "/metrics").expect("scrape the metrics endpoint");
    assert_eq!(status, 200, "GET /metrics answered {status}: {body}");
    body
}

/// The value of the sample `name` (no labels) in a scrape.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// Scrapes until `vae_steps_total` reaches `at_least`.
fn scrape_until_step(addr: &str, at_least: f64, c: &Coordinator) -> String {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let text = scrape(addr);
        if sample(&text, "vae_steps_total").is_some_and(|s| s >= at_least) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "the step count did not reach {at_least} within 120 s; last scrape:\n{text}\nlog:\n{}",
            c.log.join("\n")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Whether the Prometheus tools should be there: false (with SKIPPED printed) under
/// `VAE_SKIP_PROMETHEUS=1`; otherwise a missing `tool` fails the test, naming the package.
fn prometheus_tool(tool: &str) -> bool {
    if std::env::var("VAE_SKIP_PROMETHEUS").as_deref() == Ok("1") {
        eprintln!("SKIPPED (VAE_SKIP_PROMETHEUS=1): the checks with `{tool}` did not run");
        return false;
    }
    let found = Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "`{tool}` is not on PATH: install Debian's `prometheus` package (`apt-get install -y \
         prometheus`, which provides `prometheus` and `promtool`; .ci/run does), or set \
         VAE_SKIP_PROMETHEUS=1 to skip these checks knowingly"
    );
    true
}

#[test]
fn a_running_training_serves_every_family_and_promtool_accepts_them() {
    let out = tempfile::tempdir().unwrap();
    let (c, _worker, addr) = running_training(out.path());
    let first = scrape_until_step(&addr, 1.0, &c);
    for (name, kind) in FAMILIES {
        assert!(
            first.lines().any(|l| l == format!("# TYPE {name} {kind}")),
            "no {kind} {name} in:\n{first}"
        );
    }
    assert!(
        first.contains("vae_node_duration_seconds_count{worker=\"1\"}"),
        "no node time of worker 1 in:\n{first}"
    );
    assert_eq!(sample(&first, "vae_workers_registered"), Some(1.0));
    let step = sample(&first, "vae_steps_total").unwrap();
    let later = scrape_until_step(&addr, step + 5.0, &c);
    for name in ["vae_examples_total", "vae_step_duration_seconds_count"] {
        let (a, b) = (sample(&first, name).unwrap(), sample(&later, name).unwrap());
        assert!(b > a, "{name} did not grow: {a} -> {b}");
    }
    for name in ["vae_samples_per_second", "vae_shard_sent_bytes_total"] {
        let value = sample(&later, name).unwrap();
        assert!(value > 0.0, "{name} is {value}");
    }
    let (status, _) = get(&addr, "/nothing").unwrap();
    assert_eq!(status, 404);

    if prometheus_tool("promtool") {
        let mut check = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run promtool");
        check
            .stdin
            .take()
            .unwrap()
            .write_all(later.as_bytes())
            .unwrap();
        let result = check.wait_with_output().unwrap();
        assert!(
            result.status.success(),
            "promtool check metrics failed:\n{}{}\non:\n{later}",
            String::from_utf8_lossy(&result.stdout),
            String::from_utf8_lossy(&result.stderr)
        );
    }
}

/// A free port on 127.0.0.1 (free when asked; Prometheus binds it a moment later).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The first result of a Prometheus instant query (its labels and value), if any.
fn query(prometheus: &str, promql: &str) -> Option<(serde_json::Value, f64)> {
    let encoded: String = promql
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let (status, body) = get(prometheus, &format!("/api/v1/query?query={encoded}")).ok()?;
    if status != 200 {
        return None;
    }
    let json: serde_json::Value = serde_json::from_str(&body).ok()?;
    assert_eq!(json["status"], "success", "query {promql}: {body}");
    let first = json["data"]["result"].get(0)?;
    let value = first["value"][1].as_str()?.parse().ok()?;
    Some((first["metric"].clone(), value))
}

#[test]
fn a_real_prometheus_scrapes_samples_per_second_and_the_step_count() {
    if !prometheus_tool("prometheus") {
        return;
    }
    let out = tempfile::tempdir().unwrap();
    let (c, _worker, addr) = running_training(out.path());

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - \
             job_name: vae\n    static_configs:\n      - targets: ['{addr}']\n"
        ),
    )
    .unwrap();
    let web = format!("127.0.0.1:{}", free_port());
    let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
    let server = Killed(
        Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={web}"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start prometheus"),
    );
    let prometheus_log =
        || std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default();

    // Scraped every second: wait until the API reports a step count and a throughput.
    let deadline = Instant::now() + Duration::from_secs(120);
    let (steps, rate) = loop {
        let steps = query(&web, "vae_steps_total{job=\"vae\"}");
        let rate = query(&web, "vae_samples_per_second{job=\"vae\"}");
        if let (Some((labels, steps)), Some((_, rate))) = (&steps, &rate)
            && *steps > 0.0
            && *rate > 0.0
        {
            assert_eq!(labels["instance"], addr.as_str(), "{labels}");
            break (*steps, *rate);
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus at {web} reported no step count and samples/s within 120 s (last: \
             {steps:?}, {rate:?}); its log:\n{}\ncoordinator log:\n{}",
            prometheus_log(),
            c.log.join("\n")
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(rate.is_finite(), "samples/s {rate}");
    let (_, up) = query(&web, "up{job=\"vae\"}").expect("the target's up series");
    assert_eq!(up, 1.0, "Prometheus cannot scrape {addr}");
    // What Prometheus stored is what the endpoint served: never ahead of it.
    let now = sample(&scrape(&addr), "vae_steps_total").unwrap();
    assert!(
        steps <= now,
        "Prometheus has step {steps}, the endpoint {now}"
    );
    // And it keeps scraping: the stored step count grows.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, later) = query(&web, "vae_steps_total{job=\"vae\"}").expect("step count");
        if later > steps {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the step count Prometheus stores stayed at {steps} for 60 s; its log:\n{}",
            prometheus_log()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    drop(server);
}

//! The Docker Swarm stack (deploy/stack.yml) on a single-node swarm: a full run, and a run in
//! which a worker task's container is killed, each finishing with the fingerprint of an
//! uninterrupted single-worker run.
//!
//! Each test joins a swarm (`docker swarm init --advertise-addr 127.0.0.1` if the engine is in
//! none) and leaves everything as it found it whatever happens: a guard removes the stack, its
//! volume and secret, and leaves the swarm if the test created it. Needs a Docker engine: a
//! missing engine fails these tests with a message, so a run without them never looks green by
//! accident. `VAE_SKIP_DOCKER=1` skips them on purpose (each prints SKIPPED).

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The stack's training run: the compose cluster's (coordinator/tests/cluster.rs) with three
/// epochs instead of five, as steps over the overlay network take longer (~25 s of training on
/// a quiet machine, ~1,000 steps). The stack adds `--resume` and `--workers` itself.
const TRAIN_ARGS: &str = "--data synthetic:24000 --holdout 2000 --hidden 256 --latent 8 \
    --batch 64 --shards 16 --epochs 3 --iw-samples 0 --checkpoint-every 25 --worker-timeout 3";

const WORKERS: usize = 4;

/// Its own tag, so a compose cluster test building `vae-dist:test` at the same time does not
/// swap the image under a running stack.
const IMAGE: &str = "vae-dist:swarm-test";

/// The unprivileged user every container runs as (deploy/Dockerfile).
const CONTAINER_UID: u32 = 65532;

/// A node label marking a swarm this test created, so a swarm left behind by a test that was
/// killed before its guard ran is still left by the next run.
const SWARM_LABEL: &str = "vae-dist.test-swarm";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn docker_ready() -> bool {
    if std::env::var("VAE_SKIP_DOCKER").as_deref() == Ok("1") {
        eprintln!("SKIPPED (VAE_SKIP_DOCKER=1): the Docker Swarm tests did not run");
        return false;
    }
    let ok = Command::new("docker")
        .arg("info")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "no Docker engine is reachable: the swarm tests need one. Start the daemon, or set \
         VAE_SKIP_DOCKER=1 to skip these tests knowingly"
    );
    ok
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("run command");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn docker(args: &[&str]) -> String {
    let out = run(Command::new("docker").args(args));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Runs a clean-up command, reporting (not panicking on) a failure: guards run during unwinding.
fn try_docker(args: &[&str]) -> bool {
    match Command::new("docker").args(args).output() {
        Ok(out) if out.status.success() => true,
        Ok(out) => {
            eprintln!(
                "swarm test clean-up: docker {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
            false
        }
        Err(e) => {
            eprintln!("swarm test clean-up: docker {}: {e}", args.join(" "));
            false
        }
    }
}

/// One swarm test at a time, in this process and across processes (two engineers' runs must
/// not leave a swarm under each other); the image is built once per process, under the lock.
struct Exclusive {
    _thread: std::sync::MutexGuard<'static, ()>,
    _file: File,
}

fn exclusive() -> Exclusive {
    static LOCK: Mutex<()> = Mutex::new(());
    static BUILT: OnceLock<()> = OnceLock::new();
    let thread = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let dir = root().join("target");
    std::fs::create_dir_all(&dir).unwrap();
    let file = File::create(dir.join("swarm-test.lock")).unwrap();
    file.lock().expect("lock target/swarm-test.lock");
    BUILT.get_or_init(|| {
        let started = Instant::now();
        let out = Command::new(root().join("deploy/cluster.sh"))
            .arg("build")
            .env("IMAGE", IMAGE)
            .output()
            .expect("run deploy/cluster.sh build");
        assert!(
            out.status.success(),
            "image build failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!(
            "swarm: binaries and image built in {:.1}s",
            started.elapsed().as_secs_f64()
        );
    });
    Exclusive {
        _thread: thread,
        _file: file,
    }
}

fn static_bin(name: &str) -> PathBuf {
    root()
        .join("target/static/x86_64-unknown-linux-gnu/release")
        .join(name)
}

/// The uninterrupted run's fingerprint: one local worker, same static build as the image.
fn reference() -> &'static str {
    static FINGERPRINT: OnceLock<String> = OnceLock::new();
    FINGERPRINT.get_or_init(|| {
        let started = Instant::now();
        let out = tempfile::tempdir().unwrap();
        let output = run(Command::new(static_bin("coordinator"))
            .args(TRAIN_ARGS.split_whitespace())
            .args(["--workers", "1", "--local", "--out"])
            .arg(out.path())
            .env("VAE_WORKER_BIN", static_bin("worker")));
        eprintln!(
            "swarm: reference run took {:.1}s",
            started.elapsed().as_secs_f64()
        );
        fingerprint_in(&String::from_utf8_lossy(&output.stdout)).expect("fingerprint printed")
    })
}

fn fingerprint_in(text: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.trim().strip_prefix("fingerprint "))
        .map(|f| f.trim().to_string())
}

/// Membership of a swarm; leaves it on drop if this test created it, and removes the bridge
/// network `swarm init` made if there was none before.
struct Swarm {
    created: bool,
    remove_gwbridge: bool,
}

const GWBRIDGE: &str = "docker_gwbridge";

impl Swarm {
    fn join() -> Swarm {
        let state = docker(&["info", "-f", "{{.Swarm.LocalNodeState}}"]);
        if state == "inactive" {
            let had_gwbridge = Command::new("docker")
                .args(["network", "inspect", GWBRIDGE])
                .output()
                .is_ok_and(|o| o.status.success());
            docker(&["swarm", "init", "--advertise-addr", "127.0.0.1"]);
            let swarm = Swarm {
                created: true,
                remove_gwbridge: !had_gwbridge,
            };
            let node = docker(&["info", "-f", "{{.Swarm.NodeID}}"]);
            docker(&[
                "node",
                "update",
                "--label-add",
                &format!("{SWARM_LABEL}=1"),
                &node,
            ]);
            return swarm;
        }
        assert_eq!(
            state, "active",
            "this engine's swarm state is `{state}`: leave or repair the swarm first"
        );
        assert_eq!(
            docker(&["info", "-f", "{{.Swarm.ControlAvailable}}"]),
            "true",
            "this engine is a worker node of a swarm: `docker stack deploy` needs a manager"
        );
        let label = docker(&[
            "node",
            "inspect",
            "self",
            "-f",
            &format!("{{{{index .Spec.Labels \"{SWARM_LABEL}\"}}}}"),
        ]);
        Swarm {
            created: label == "1",
            remove_gwbridge: false,
        }
    }
}

impl Drop for Swarm {
    fn drop(&mut self) {
        if self.created && try_docker(&["swarm", "leave", "--force"]) && self.remove_gwbridge {
            try_docker(&["network", "rm", GWBRIDGE]);
        }
    }
}

/// A deployed stack with its own secret and output volume; removed on drop, then the swarm is
/// left (field order) if this test created it.
struct Stack {
    name: String,
    token: String,
    started: Instant,
    _swarm: Swarm,
}

impl Stack {
    fn deploy(scenario: &str) -> Stack {
        let swarm = Swarm::join();
        let token = hex::encode(rand::random::<[u8; 16]>());
        let stack = Stack {
            name: format!("vaeswarm{scenario}{}", std::process::id()),
            token,
            started: Instant::now(),
            _swarm: swarm,
        };
        let mut create = Command::new("docker")
            .args(["secret", "create", &stack.secret(), "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("docker secret create");
        create
            .stdin
            .take()
            .unwrap()
            .write_all(stack.token.as_bytes())
            .unwrap();
        let created = create.wait_with_output().unwrap();
        assert!(
            created.status.success(),
            "docker secret create failed: {}",
            String::from_utf8_lossy(&created.stderr)
        );
        run(Command::new("docker")
            .args(["stack", "deploy", "--resolve-image", "never", "-c"])
            .arg(root().join("deploy/stack.yml"))
            .arg(&stack.name)
            .env("IMAGE", IMAGE)
            .env("WORKERS", WORKERS.to_string())
            .env("TRAIN_ARGS", TRAIN_ARGS)
            .env("TOKEN_SECRET", stack.secret())
            .env("WORKER_RETRY_FOR", "120")
            .env("RUST_LOG", "info")
            .env_remove("COORDINATOR_CONSTRAINT"));
        stack
    }

    fn secret(&self) -> String {
        format!("{}_token", self.name)
    }

    fn volume(&self) -> String {
        format!("{}_out", self.name)
    }

    fn service(&self, service: &str) -> String {
        format!("{}_{service}", self.name)
    }

    /// Running containers of a service's tasks.
    fn containers(&self, service: &str) -> Vec<String> {
        docker(&[
            "ps",
            "-q",
            "--filter",
            &format!(
                "label=com.docker.swarm.service.name={}",
                self.service(service)
            ),
        ])
        .lines()
        .map(str::to_string)
        .collect()
    }

    /// Everything every coordinator task wrote (stdout and stderr), restarted tasks included.
    fn logs(&self) -> String {
        match Command::new("docker")
            .args(["service", "logs", "--raw", "--no-trunc"])
            .arg(self.service("coordinator"))
            .output()
        {
            Ok(out) => format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => format!("(docker service logs: {e})"),
        }
    }

    fn wait_log(&self, needle: &str, count: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.logs().matches(needle).count() < count {
            assert!(
                Instant::now() < deadline,
                "no `{needle}` x{count} in time; tasks:\n{}\nlogs:\n{}",
                self.tasks(),
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    fn tasks(&self) -> String {
        Command::new("docker")
            .args(["stack", "ps", "--no-trunc", &self.name])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
            .unwrap_or_default()
    }

    /// The coordinator's task IDs, newest first.
    fn coordinator_tasks(&self) -> Vec<String> {
        docker(&[
            "service",
            "ps",
            "-q",
            "--no-trunc",
            &self.service("coordinator"),
        ])
        .lines()
        .map(str::to_string)
        .collect()
    }

    /// Waits for the coordinator to finish (its task complete, exit status 0) and returns the
    /// fingerprint in the run's summary.json on the volume, after checking the printed one.
    fn finish(&self, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        let task = loop {
            let task = self.coordinator_tasks().into_iter().next();
            if let Some(task) = task {
                let state = docker(&[
                    "inspect",
                    "--type",
                    "task",
                    "-f",
                    "{{.Status.State}}",
                    &task,
                ]);
                if state == "complete" {
                    break task;
                }
            }
            assert!(
                Instant::now() < deadline,
                "run did not finish; tasks:\n{}\nlogs:\n{}",
                self.tasks(),
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(250));
        };
        let code = docker(&[
            "inspect",
            "--type",
            "task",
            "-f",
            "{{.Status.ContainerStatus.ExitCode}}",
            &task,
        ]);
        let logs = self.logs();
        assert_eq!(code, "0", "coordinator failed:\n{logs}");
        let restarts = self.coordinator_tasks().len() - 1;
        eprintln!(
            "{}: run took {:.1}s from deploy ({restarts} coordinator restart(s))",
            self.name,
            self.started.elapsed().as_secs_f64()
        );
        let printed = fingerprint_in(&logs).expect("the coordinator printed its fingerprint");
        let summary = self.summary();
        let stored = summary["fingerprint"].as_str().unwrap().to_string();
        assert_eq!(printed, stored, "printed and stored fingerprints differ");
        stored
    }

    /// summary.json from the output volume, copied out through a container that is created
    /// but never started (the README's way to get outputs back).
    fn summary(&self) -> serde_json::Value {
        let holder = docker(&["create", "-v", &format!("{}:/out", self.volume()), IMAGE]);
        let dir = tempfile::tempdir().unwrap();
        let copied = Command::new("docker")
            .args([
                "cp",
                &format!("{holder}:/out"),
                &dir.path().to_string_lossy(),
            ])
            .output();
        try_docker(&["rm", &holder]);
        let copied = copied.expect("docker cp");
        assert!(
            copied.status.success(),
            "docker cp from the volume failed: {}",
            String::from_utf8_lossy(&copied.stderr)
        );
        for file in [
            "model.safetensors",
            "checkpoint.safetensors",
            "metrics.jsonl",
        ] {
            assert!(
                dir.path().join("out").join(file).is_file(),
                "{file} is not on the volume"
            );
        }
        serde_json::from_str(
            &std::fs::read_to_string(dir.path().join("out/summary.json"))
                .expect("summary.json on the volume"),
        )
        .unwrap()
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        let since = Instant::now();
        try_docker(&["stack", "rm", &self.name]);
        // Services go at once; their containers, the network and the volume's users a little
        // later. The volume can be removed when no container uses it any more.
        let deadline = Instant::now() + Duration::from_secs(60);
        let namespace = format!("label=com.docker.stack.namespace={}", self.name);
        loop {
            let left = Command::new("docker")
                .args(["ps", "-aq", "--filter", &namespace])
                .output()
                .map(|o| !o.stdout.is_empty())
                .unwrap_or(false);
            if !left || Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        while !try_docker(&["volume", "rm", &self.volume()]) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(500));
        }
        try_docker(&["secret", "rm", &self.secret()]);
        eprintln!(
            "{}: removed in {:.1}s",
            self.name,
            since.elapsed().as_secs_f64()
        );
    }
}

/// A container runs unprivileged: its processes as uid 65532, a read-only root filesystem and
/// no capabilities (swarm has no no-new-privileges: deploy/stack.yml).
fn assert_hardened(id: &str) {
    let inspect = docker(&[
        "inspect",
        "-f",
        "{{.Config.User}} {{.HostConfig.ReadonlyRootfs}} {{.HostConfig.CapDrop}}",
        id,
    ]);
    assert_eq!(inspect, "65532:65532 true [ALL]", "{id}");
    // The engine needs the pid column to match processes to the container.
    let top = docker(&["top", id, "-o", "pid,uid,comm"]);
    let uids: Vec<&str> = top
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(1))
        .collect();
    assert!(
        !uids.is_empty() && uids.iter().all(|u| *u == CONTAINER_UID.to_string()),
        "{id}: processes run as {uids:?}:\n{top}"
    );
}

#[test]
fn a_swarm_stack_equals_a_single_worker_run() {
    if !docker_ready() {
        return;
    }
    let _lock = exclusive();
    let expected = reference();
    let stack = Stack::deploy("full");
    stack.wait_log("joined", WORKERS, Duration::from_secs(120));
    let containers: Vec<String> = stack
        .containers("coordinator")
        .into_iter()
        .chain(stack.containers("worker"))
        .collect();
    assert_eq!(containers.len(), 1 + WORKERS, "{}", stack.tasks());
    for id in &containers {
        assert_hardened(id);
    }
    assert_eq!(stack.finish(Duration::from_secs(300)), expected);
    assert!(
        !stack.logs().contains(&stack.token),
        "the token never reaches the log"
    );
}

#[test]
fn a_killed_worker_task_is_replaced_and_costs_nothing_but_time() {
    if !docker_ready() {
        return;
    }
    let _lock = exclusive();
    let expected = reference();
    let stack = Stack::deploy("kill");
    stack.wait_log("joined", WORKERS, Duration::from_secs(120));
    // Training is under way: a progress line comes every 5 s of training.
    stack.wait_log("ETA", 1, Duration::from_secs(60));
    let victim = stack.containers("worker").remove(1);
    docker(&["kill", &victim]);
    let since = Instant::now();
    stack.wait_log("lost", 1, Duration::from_secs(30));
    eprintln!(
        "{}: docker kill detected within {:.1}s",
        stack.name,
        since.elapsed().as_secs_f64()
    );
    // Swarm starts a new task in the killed one's place; it registers as a new worker.
    stack.wait_log("joined", WORKERS + 1, Duration::from_secs(60));
    eprintln!(
        "{}: replacement task joined {:.1}s after the kill",
        stack.name,
        since.elapsed().as_secs_f64()
    );
    assert_eq!(stack.finish(Duration::from_secs(300)), expected);
}

//! A run's life in `--out` (issue 10): SIGTERM and SIGINT stop it with a checkpoint and a distinct
//! exit status, and `--resume` then ends with the uninterrupted fingerprint; a truncated newest
//! checkpoint falls back to the previous one; a checkpoint that cannot be written fails the run; a
//! finished run whose model is missing gets it on `--resume`; a fresh run refuses a directory
//! holding another run unless `--force`.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{Coordinator, SMALL_RUN, summary, train, wait_timeout};

/// SMALL_RUN for 10 epochs (320 steps) with a checkpoint every 5 steps: long enough that a signal
/// sent once the first checkpoints exist lands mid-run.
const LONG: &[&str] = &["--epochs", "10", "--checkpoint-every", "5"];

fn long_run(extra: &[&'static str]) -> Vec<&'static str> {
    let mut args = SMALL_RUN.to_vec();
    args.extend_from_slice(LONG);
    args.extend_from_slice(&["--workers", "1", "--local"]);
    args.extend_from_slice(extra);
    args
}

/// The fingerprint of the uninterrupted long run.
fn reference() -> &'static str {
    static FINGERPRINT: OnceLock<String> = OnceLock::new();
    FINGERPRINT.get_or_init(|| {
        let out = tempfile::tempdir().unwrap();
        train(out.path(), 1, LONG)
    })
}

fn wait_for_file(path: &Path, c: &mut Coordinator) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !path.exists() {
        if Instant::now() >= deadline {
            c.wait_log("", Duration::ZERO);
            panic!(
                "{} never appeared; log:\n{}",
                path.display(),
                c.log.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn send(c: &Coordinator, signal: &str) {
    let status = Command::new("kill")
        .args([&format!("-{signal}"), &c.child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{signal} failed");
}

/// Sends `signal`, waits for the coordinator to exit; returns its exit code and the global step
/// of the checkpoint it reported.
fn stop(mut c: Coordinator, signal: &str) -> (Option<i32>, u64, String) {
    send(&c, signal);
    let status = wait_timeout(&mut c.child, Duration::from_secs(60))
        .unwrap_or_else(|| panic!("no exit after SIG{signal}; log:\n{}", c.log.join("\n")));
    let said = format!("stopped by SIG{signal} at epoch");
    c.wait_log(&said, Duration::from_secs(5));
    let log = c.log.join("\n");
    let line = log
        .lines()
        .find(|l| l.contains(&said))
        .unwrap_or_else(|| panic!("no `{said}` line; log:\n{log}"));
    assert!(
        line.contains("checkpoint.safetensors")
            && line.contains("rerun the same command with --resume to continue"),
        "{line}"
    );
    let step = line
        .split("(global step ")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no global step in: {line}"));
    (status.code(), step, log)
}

fn coordinator(out: &Path, args: &[&str]) -> Output {
    Command::new(common::coordinator_bin())
        .args(["--listen", "127.0.0.1:0", "--out"])
        .arg(out)
        .args(args)
        .env("RUST_LOG", "info")
        .output()
        .expect("run coordinator")
}

fn resume_to_the_end(out: &Path) -> String {
    let c = Coordinator::start(out, &long_run(&["--resume"]));
    let (ok, log) = c.finish(Duration::from_secs(240));
    assert!(ok, "the resumed run failed; log:\n{log}");
    log
}

#[test]
fn sigterm_then_resume_gives_the_uninterrupted_fingerprint() {
    let out = tempfile::tempdir().unwrap();
    let mut c = Coordinator::start(out.path(), &long_run(&[]));
    wait_for_file(&out.path().join("checkpoint.safetensors"), &mut c);
    let (code, step, log) = stop(c, "TERM");
    assert_eq!(code, Some(143), "128 + SIGTERM; log:\n{log}");
    assert!(
        step > 0 && step < 320 && !out.path().join("summary.json").exists(),
        "stopped mid-run, at step {step}; log:\n{log}"
    );
    let log = resume_to_the_end(out.path());
    assert!(
        log.contains("checkpoint.safetensors at epoch") && log.contains(&format!("step {step})")),
        "resumed from the signal's checkpoint; log:\n{log}"
    );
    assert_eq!(summary(out.path())["fingerprint"], reference());
}

#[test]
fn a_truncated_newest_checkpoint_resumes_from_the_previous_one() {
    let out = tempfile::tempdir().unwrap();
    let newest = out.path().join("checkpoint.safetensors");
    let prev = out.path().join("checkpoint.prev.safetensors");
    let mut c = Coordinator::start(out.path(), &long_run(&[]));
    wait_for_file(&prev, &mut c);
    let (code, _, log) = stop(c, "TERM");
    assert_eq!(code, Some(143), "{log}");
    let bytes = std::fs::read(&newest).unwrap();
    std::fs::write(&newest, &bytes[..bytes.len() / 2]).unwrap();

    let log = resume_to_the_end(out.path());
    assert!(
        log.contains("the newest checkpoint cannot be read")
            && log.contains(&newest.display().to_string())
            && log.contains(&format!("resuming from {} at epoch", prev.display())),
        "{log}"
    );
    assert!(out.path().join("checkpoint.corrupt.safetensors").is_file());
    assert_eq!(summary(out.path())["fingerprint"], reference());
    for kept in [&newest, &prev] {
        ::common::formats::Checkpoint::load(kept)
            .unwrap_or_else(|e| panic!("{} is kept readable: {e}", kept.display()));
    }
}

/// Checkpoints are written beside training, but one that cannot be written still fails the run,
/// with an error naming the file, and leaves the newest one in place. Here the previous
/// checkpoint's name becomes a directory mid-run, so the newest cannot be rotated into it.
#[test]
fn a_checkpoint_that_cannot_be_written_fails_the_run_naming_the_file() {
    let out = tempfile::tempdir().unwrap();
    let (newest, prev) = (
        out.path().join("checkpoint.safetensors"),
        out.path().join("checkpoint.prev.safetensors"),
    );
    let mut c = Coordinator::start(out.path(), &long_run(&[]));
    wait_for_file(&newest, &mut c);
    // The writer renames the newest onto `prev` every 5 steps: retry until the directory wins.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let _ = std::fs::remove_file(&prev);
        if std::fs::create_dir(&prev).is_ok() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no directory at {}",
            prev.display()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    std::fs::write(prev.join("in-the-way"), b"").unwrap();
    let (ok, log) = c.finish(Duration::from_secs(240));
    assert!(
        !ok,
        "the run ended well without its checkpoints; log:\n{log}"
    );
    assert!(
        log.contains("could not be written")
            && log.contains("checkpoint.prev.safetensors: Is a directory"),
        "the error names the file; log:\n{log}"
    );
    assert!(
        newest.is_file() && !out.path().join("summary.json").exists(),
        "log:\n{log}"
    );
}

#[test]
fn a_finished_run_without_its_model_gets_it_on_resume() {
    let out = tempfile::tempdir().unwrap();
    let fingerprint = train(out.path(), 1, &["--epochs", "1"]);
    let model = out.path().join("model.safetensors");
    std::fs::remove_file(&model).unwrap();
    std::fs::remove_file(out.path().join("summary.json")).unwrap();

    let mut args = SMALL_RUN.to_vec();
    args.extend_from_slice(&["--epochs", "1", "--workers", "1", "--resume"]);
    let run = coordinator(out.path(), &args);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr),
    );
    assert!(run.status.success(), "{stderr}");
    assert!(
        stderr.contains("model.safetensors is missing: wrote it from the final checkpoint"),
        "{stderr}"
    );
    assert!(
        stdout.contains(&format!("fingerprint {fingerprint}")),
        "{stdout}"
    );
    let written = ::common::formats::load_model(&model).unwrap();
    assert_eq!(::common::formats::fingerprint(&written.params), fingerprint);
    assert_eq!(summary(out.path())["fingerprint"], fingerprint.as_str());

    // With every output present there is nothing to do.
    let again = coordinator(out.path(), &args);
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert_eq!(again.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("already finished"), "{stderr}");
}

#[test]
fn a_fresh_run_refuses_an_out_holding_another_run_unless_forced() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path();
    std::fs::write(out.join("checkpoint.safetensors"), "another run's").unwrap();
    std::fs::write(out.join("config.toml"), "epochs = 1\n").unwrap();
    std::fs::write(out.join("notes.txt"), "mine").unwrap();
    let mut args = SMALL_RUN.to_vec();
    args.extend_from_slice(&["--workers", "1"]);

    let refused = coordinator(out, &args);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{stderr}");
    for want in [
        &out.display().to_string(),
        "holds another run",
        "checkpoint.safetensors",
        "--resume",
        "--force",
    ] {
        assert!(stderr.contains(want), "`{want}` missing from: {stderr}");
    }
    assert_eq!(
        std::fs::read_to_string(out.join("checkpoint.safetensors")).unwrap(),
        "another run's",
        "nothing was touched"
    );

    let mut both = args.clone();
    both.extend_from_slice(&["--resume", "--force"]);
    assert_eq!(coordinator(out, &both).status.code(), Some(2));

    let mut forced = args.clone();
    forced.push("--force");
    let mut c = Coordinator::start(out, &forced);
    assert!(
        c.wait_log("--force: deleted", Duration::from_secs(5))
            && c.log.iter().any(|l| l.contains("config.toml")),
        "{}",
        c.log.join("\n")
    );
    assert!(!out.join("checkpoint.safetensors").exists());
    assert_eq!(
        std::fs::read_to_string(out.join("notes.txt")).unwrap(),
        "mine"
    );
    let toml = std::fs::read_to_string(out.join("config.toml")).unwrap();
    assert!(
        toml.contains("hidden = [64]") && !toml.contains("force"),
        "{toml}"
    );

    // SIGINT while waiting for workers: a checkpoint of step 0, status 130.
    let (code, step, log) = stop(c, "INT");
    assert_eq!((code, step), (Some(130), 0), "{log}");
    ::common::formats::Checkpoint::load(&out.join("checkpoint.safetensors")).unwrap();
    // The directory now holds the forced run.
    assert_eq!(coordinator(out, &args).status.code(), Some(1));
}

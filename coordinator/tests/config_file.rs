//! `--config`: a run from a settings file equals the same run from flags, and a run repeated from
//! the `config.toml` it wrote has the same fingerprint.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{Coordinator, SMALL_RUN, summary};

fn local_run(out: &Path, args: &[&str]) -> String {
    let mut all = args.to_vec();
    all.extend_from_slice(&["--workers", "1", "--local"]);
    let c = Coordinator::start(out, &all);
    let (ok, log) = c.finish(Duration::from_secs(240));
    assert!(ok, "{log}");
    summary(out)["fingerprint"].as_str().unwrap().to_string()
}

#[test]
fn runs_from_a_file_and_from_its_own_written_config_equal_the_run_from_flags() {
    let dir = tempfile::tempdir().unwrap();
    let from_flags = local_run(&dir.path().join("flags"), SMALL_RUN);

    // The same settings written by hand, as a user would keep them next to their code.
    let file = dir.path().join("run.toml");
    std::fs::write(
        &file,
        r#"# SMALL_RUN as a file
data = "synthetic:2400"
holdout = 400
hidden = [64]
latent = 8
batch = 64
shards = 8
epochs = 2
iw-samples = 10
"#,
    )
    .unwrap();
    let from_file = local_run(
        &dir.path().join("file"),
        &["--config", file.to_str().unwrap()],
    );
    assert_eq!(
        from_file, from_flags,
        "a run from --config equals the run from flags"
    );

    let written = dir.path().join("flags/config.toml");
    let text = std::fs::read_to_string(&written).unwrap();
    assert!(text.contains("hidden = [64]"), "{text}");
    let repeated = local_run(
        &dir.path().join("repeat"),
        &["--config", written.to_str().unwrap()],
    );
    assert_eq!(repeated, from_flags, "a run repeated from its config.toml");
}

#[test]
fn an_unknown_key_is_an_error_that_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("run.toml");
    std::fs::write(&file, "epochs = 2\nlearning-rate = 0.1\n").unwrap();
    let out = std::process::Command::new(common::coordinator_bin())
        .args(["--config", file.to_str().unwrap(), "--out"])
        .arg(dir.path().join("out"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("`learning-rate`") && err.contains("run.toml"),
        "{err}"
    );
    assert!(!dir.path().join("out").exists(), "nothing was started");
}

//! Running part of a test in a child process and bounding its peak memory, and replaying a fuzz
//! corpus that way. Shared by `common/tests/{fuzz_corpora,hostile_inputs}.rs`,
//! `proto/tests/fuzz_corpora.rs` and `worker/tests/fuzz_corpora.rs` (`#[path]` modules).
//!
//! Peak memory is read from `/proc/self/status`: `VmHWM` (peak resident set) and `VmPeak` (peak
//! address space, which also counts memory allocated but never touched, such as a large
//! zero-filled `Vec`). The child runs only the one test, on one thread, so the deltas between
//! before and after belong to the body alone.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// Set in the child to the name of the test it runs.
const CHILD_ENV: &str = "VAE_PEAK_MEMORY_CHILD";

/// `VmHWM` and `VmPeak` of this process, in KiB.
pub fn peaks_kib() -> (u64, u64) {
    let (hwm, peak, _) = status_kib();
    (hwm, peak)
}

/// `VmHWM`, `VmPeak` and `VmSize` of this process, in KiB.
fn status_kib() -> (u64, u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc/self/status"))
    };
    (field("VmHWM:"), field("VmPeak:"), field("VmSize:"))
}

/// Runs `body` in a child process (this test binary, running only `test`), and fails unless it
/// succeeds with its peak resident memory less than `rss_mib` MiB and its peak address space less
/// than `virtual_mib` MiB above what they were before it. `test` is the calling test's name (the
/// function's name for a test at the top of the file). Returns the child's report line.
pub fn bounded_in_child(test: &str, rss_mib: u64, virtual_mib: u64, body: impl FnOnce()) -> String {
    if std::env::var(CHILD_ENV).as_deref() == Ok(test) {
        // A line of its own after libtest's `test name ... `.
        println!();
        let (rss_before, _, virtual_before) = status_kib();
        body();
        let (rss_after, virtual_after, _) = status_kib();
        let rss = (rss_after - rss_before) as f64 / 1024.0;
        let virt = (virtual_after - virtual_before) as f64 / 1024.0;
        println!(
            "PEAK {test}: resident +{rss:.1} MiB (bound {rss_mib}; {} -> {} MiB), address space \
             +{virt:.1} MiB (bound {virtual_mib}; {} -> {} MiB)",
            rss_before / 1024,
            rss_after / 1024,
            virtual_before / 1024,
            virtual_after / 1024
        );
        assert!(
            rss < rss_mib as f64,
            "{test}: peak resident memory grew {rss:.1} MiB"
        );
        assert!(
            virt < virtual_mib as f64,
            "{test}: peak address space grew {virt:.1} MiB"
        );
        return String::new();
    }
    let output = Command::new(std::env::current_exe().expect("the test binary"))
        .args([test, "--exact", "--test-threads=1", "--nocapture"])
        .env(CHILD_ENV, test)
        .output()
        .expect("running the test binary again");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{test} failed in its child process ({}):\n{stdout}\n{stderr}",
        output.status
    );
    // The child's own lines (not libtest's).
    for line in stdout.lines().filter(|l| {
        !(l.is_empty()
            || l.starts_with("running ")
            || l.starts_with("test ")
            || l.starts_with("successes:"))
    }) {
        println!("  {line}");
    }
    stdout
        .lines()
        .find(|l| l.starts_with("PEAK "))
        .unwrap_or_else(|| panic!("{test}: the child ran nothing:\n{stdout}\n{stderr}"))
        .to_string()
}

/// `fuzz/corpus/<target>` of this repository.
pub fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target)
}

/// Runs every file of `fuzz/corpus/<target>` through `run` (the fuzz target's own function) in a
/// child process whose peak memory must stay within the bounds (see [`bounded_in_child`]). A
/// panic names the file. Fails if the corpus is missing or empty.
pub fn replay_corpus(test: &str, target: &str, run: fn(&[u8]), rss_mib: u64, virtual_mib: u64) {
    let dir = corpus_dir(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{}: no corpus files", dir.display());
    let count = files.len();
    bounded_in_child(test, rss_mib, virtual_mib, || {
        for file in &files {
            let bytes = std::fs::read(file).expect("a corpus file");
            if std::panic::catch_unwind(|| run(&bytes)).is_err() {
                panic!(
                    "corpus file {} makes target `{target}` panic",
                    file.display()
                );
            }
        }
        println!("replayed {count} files of target `{target}`");
    });
}

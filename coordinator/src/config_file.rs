//! `--config run.toml`: a run's settings in a file, keyed exactly like the flags (`epochs = 3`,
//! `hidden = [512, 256]`, `data = "synthetic"`, `local = true`). The file is turned into
//! command-line arguments placed before the real ones, so flags given on the command line override
//! it, and both go through one parser and one set of checks. Every run writes its effective
//! settings in the same form as `config.toml` in `--out`, so `--config out/config.toml` repeats it.

use std::ffi::OsString;
use std::path::Path;

use clap::CommandFactory;
use common::model::Likelihood;
use common::optim::OptimizerConfig;
use toml::{Table, Value};

use crate::cli::Cli;
use crate::config::TrainConfig;
use crate::error::{Error, Result};

/// The effective settings of a run, beside its outputs.
pub const CONFIG_TOML: &str = "config.toml";

/// Files larger than this are not run settings.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// `args` (the program name first) with the settings of `--config FILE` spliced in before the
/// other arguments. Without `--config`, `args` unchanged.
pub fn expand(args: Vec<OsString>) -> Result<Vec<OsString>> {
    let Some(path) = config_path(&args) else {
        return Ok(args);
    };
    let flags = read(Path::new(&path))?;
    let mut expanded = Vec::with_capacity(args.len() + flags.len());
    let mut rest = args.into_iter();
    expanded.extend(rest.next());
    expanded.extend(flags.into_iter().map(OsString::from));
    expanded.extend(rest);
    Ok(expanded)
}

/// The value of `--config PATH` or `--config=PATH`, if given.
fn config_path(args: &[OsString]) -> Option<OsString> {
    let mut iter = args.iter().skip(1);
    while let Some(arg) = iter.next() {
        if arg == "--" {
            return None;
        }
        if arg == "--config" {
            return iter.next().cloned();
        }
        if let Some(value) = arg.to_str().and_then(|a| a.strip_prefix("--config=")) {
            return Some(value.into());
        }
    }
    None
}

/// The flags a settings file stands for.
pub fn read(path: &Path) -> Result<Vec<String>> {
    let what = |e: String| Error::Config(format!("--config {}: {e}", path.display()));
    let size = std::fs::metadata(path)
        .map_err(|e| what(e.to_string()))?
        .len();
    if size > MAX_CONFIG_BYTES {
        return Err(what(format!(
            "{size} bytes is too large for a settings file"
        )));
    }
    let text = std::fs::read_to_string(path).map_err(|e| what(e.to_string()))?;
    let table: Table = text
        .parse()
        .map_err(|e: toml::de::Error| what(e.to_string()))?;
    to_flags(&table).map_err(what)
}

/// Keys a settings file may use: every long flag of the training command but these. `force`
/// deletes another run's outputs: it is given on the command line each time, never kept in a
/// file (and [`to_toml`] never writes it), so repeating a run from its `config.toml` into the same
/// `--out` is refused rather than silently replacing the run.
fn allowed_keys() -> Vec<String> {
    Cli::command()
        .get_arguments()
        .filter_map(|a| a.get_long())
        .filter(|name| !matches!(*name, "help" | "version" | "config" | "token" | "force"))
        .map(str::to_string)
        .collect()
}

fn to_flags(table: &Table) -> std::result::Result<Vec<String>, String> {
    let allowed = allowed_keys();
    let mut flags = Vec::new();
    for (key, value) in table {
        if key == "token" {
            return Err(
                "`token` does not belong in a settings file (files get copied and committed): \
                 put the token in its own file and name it with `token-file`"
                    .into(),
            );
        }
        if key == "force" {
            return Err(
                "`force` does not belong in a settings file (it deletes the outputs of the run \
                 in --out): give --force on the command line when you mean it"
                    .into(),
            );
        }
        if !allowed.contains(key) {
            return Err(format!(
                "unknown key `{key}`; the keys are the training flags without their dashes: {}",
                allowed.join(", ")
            ));
        }
        let text = match value {
            Value::Boolean(true) => {
                flags.push(format!("--{key}"));
                continue;
            }
            Value::Boolean(false) => continue,
            Value::String(s) => s.clone(),
            Value::Integer(i) => i.to_string(),
            Value::Float(f) => f.to_string(),
            Value::Array(items) => items
                .iter()
                .map(|item| match item {
                    Value::Integer(i) => Ok(i.to_string()),
                    Value::String(s) => Ok(s.clone()),
                    other => Err(format!("`{key}`: cannot use {other} in a list")),
                })
                .collect::<std::result::Result<Vec<_>, _>>()?
                .join(","),
            other => {
                return Err(format!(
                    "`{key}` = {other}: expected a string, number or list"
                ));
            }
        };
        flags.push(format!("--{key}={text}"));
    }
    Ok(flags)
}

/// `config` as a settings file: every key `--config` reads, so the file alone repeats the run.
pub fn to_toml(config: &TrainConfig) -> String {
    let mut t = Table::new();
    let mut set = |key: &str, value: Value| {
        t.insert(key.to_string(), value);
    };
    let path = |p: &Path| Value::String(p.display().to_string());
    set("data", Value::String(config.data.to_string()));
    if let Some(h) = config.holdout {
        set("holdout", Value::Integer(h as i64));
    }
    set("epochs", Value::Integer(config.epochs as i64));
    set("batch", Value::Integer(config.batch as i64));
    set("shards", Value::Integer(config.shards as i64));
    // TOML integers are i64; larger seeds go as strings, which the flag parser reads the same.
    set(
        "seed",
        i64::try_from(config.seed)
            .map_or_else(|_| Value::String(config.seed.to_string()), Value::Integer),
    );
    set(
        "hidden",
        Value::Array(
            config
                .hidden
                .iter()
                .map(|&h| Value::Integer(h as i64))
                .collect(),
        ),
    );
    set("latent", Value::Integer(config.latent as i64));
    match config.likelihood {
        Likelihood::Bernoulli => set("likelihood", Value::String("bernoulli".into())),
        Likelihood::Gaussian { variance } => {
            set("likelihood", Value::String("gaussian".into()));
            set("gaussian-variance", Value::Float(variance));
        }
    }
    set("samples", Value::Integer(config.samples as i64));
    match &config.optimizer {
        OptimizerConfig::Adam {
            lr, weight_decay, ..
        } => {
            set("optimizer", Value::String("adam".into()));
            set("lr", Value::Float(*lr));
            set("weight-decay", Value::Float(*weight_decay));
        }
        OptimizerConfig::Sgd {
            lr,
            momentum,
            weight_decay,
            ..
        } => {
            set("optimizer", Value::String("sgd".into()));
            set("lr", Value::Float(*lr));
            set("momentum", Value::Float(*momentum));
            set("weight-decay", Value::Float(*weight_decay));
        }
    }
    if let Some(c) = config.clip_norm {
        set("clip-norm", Value::Float(c));
    }
    set("iw-samples", Value::Integer(config.iw_samples as i64));
    if let Some(p) = &config.init_from {
        set("init-from", path(p));
    }
    set("workers", Value::Integer(config.workers as i64));
    set("local", Value::Boolean(config.local));
    if let Some(n) = config.worker_threads {
        set("worker-threads", Value::Integer(n as i64));
    }
    set("listen", Value::String(config.listen.clone()));
    set("transport", Value::String(transport_name(config)));
    set("out", path(&config.out));
    set(
        "checkpoint-every",
        Value::Integer(config.checkpoint_every as i64),
    );
    set(
        "checkpoint-seconds",
        Value::Float(config.checkpoint_seconds),
    );
    set("worker-timeout", Value::Float(config.worker_timeout_secs));
    set(
        "no-worker-timeout",
        Value::Float(config.no_worker_timeout_secs),
    );
    set("resume", Value::Boolean(config.resume));
    set(
        "pictures-every-epoch",
        Value::Boolean(config.pictures_every_epoch),
    );
    if let Some(p) = &config.token_file {
        set("token-file", path(p));
    }
    if let Some(tls) = &config.tls {
        set("tls-cert", path(&tls.cert));
        set("tls-key", path(&tls.key));
        if let Some(ca) = &tls.client_ca {
            set("tls-ca", path(ca));
        }
    }
    set("insecure", Value::Boolean(config.insecure));
    set("max-workers", Value::Integer(config.max_workers as i64));
    set(
        "max-connections",
        Value::Integer(config.max_connections as i64),
    );
    set("idle-timeout", Value::Float(config.idle_timeout_secs));
    set("verify", Value::Float(config.verify));
    if let Some(addr) = &config.metrics_addr {
        set("metrics-addr", Value::String(addr.clone()));
    }
    format!(
        "# The effective settings of this run. `coordinator --config {CONFIG_TOML}` repeats it;\n\
         # flags given as well override these. The token itself is never written here.\n{}",
        toml::to_string(&t).expect("plain values serialise")
    )
}

fn transport_name(config: &TrainConfig) -> String {
    use clap::ValueEnum;
    config
        .transport
        .to_possible_value()
        .expect("every transport has a name")
        .get_name()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ServerTls, Transport};
    use clap::Parser;

    fn parse(args: Vec<OsString>) -> TrainConfig {
        Cli::try_parse_from(args).unwrap().into_config().unwrap()
    }

    fn written_and_read_back(config: &TrainConfig) -> TrainConfig {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(CONFIG_TOML);
        std::fs::write(&path, to_toml(config)).unwrap();
        parse(expand(vec!["coordinator".into(), "--config".into(), path.into()]).unwrap())
    }

    #[test]
    fn a_written_config_reads_back_into_the_same_settings() {
        let configs = [
            TrainConfig::default(),
            // Checkpoints by the clock off.
            TrainConfig {
                checkpoint_seconds: 0.0,
                ..TrainConfig::default()
            },
            TrainConfig {
                data: "idx:a.gz,b.gz".parse().unwrap(),
                holdout: Some(500),
                hidden: vec![512, 256],
                likelihood: Likelihood::Gaussian { variance: 0.1 },
                optimizer: OptimizerConfig::sgd(0.05, 0.8),
                clip_norm: Some(2.5),
                worker_threads: Some(3),
                local: true,
                workers: 3,
                transport: Transport::Tcp,
                resume: true,
                pictures_every_epoch: true,
                init_from: Some("m.safetensors".into()),
                tls: Some(ServerTls {
                    cert: "c.pem".into(),
                    key: "k.pem".into(),
                    client_ca: Some("ca.pem".into()),
                }),
                listen: "0.0.0.0:50051".into(),
                seed: u64::MAX,
                idle_timeout_secs: 12.5,
                metrics_addr: Some("127.0.0.1:9464".into()),
                verify: 0.25,
                checkpoint_every: 50,
                checkpoint_seconds: 0.25,
                ..TrainConfig::default()
            },
        ];
        for config in configs {
            let mut config = config;
            if config.local && config.tls.is_some() {
                config.local = false; // refused together; keep the rest
            }
            assert_eq!(written_and_read_back(&config), config);
        }
    }

    #[test]
    fn flags_override_the_file_and_unknown_keys_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.toml");
        std::fs::write(&path, "epochs = 3\nhidden = [64, 32]\nlocal = true\n").unwrap();
        let args = |extra: &[&str]| {
            let mut a: Vec<OsString> = vec!["coordinator".into(), "--config".into()];
            a.push(path.clone().into());
            a.extend(extra.iter().map(OsString::from));
            expand(a).unwrap()
        };
        let c = parse(args(&[]));
        assert_eq!(
            (c.epochs, c.hidden.clone(), c.local),
            (3, vec![64, 32], true)
        );
        let c = parse(args(&["--epochs", "5"]));
        assert_eq!(c.epochs, 5, "the command line wins");

        std::fs::write(&path, "epochs = 3\nepochz = 4\n").unwrap();
        let e = read(&path).unwrap_err().to_string();
        assert!(e.contains("`epochz`") && e.contains("run.toml"), "{e}");
        std::fs::write(&path, "token = \"s3cret\"\n").unwrap();
        assert!(read(&path).unwrap_err().to_string().contains("token-file"));
        std::fs::write(&path, "force = true\n").unwrap();
        let e = read(&path).unwrap_err().to_string();
        assert!(e.contains("--force on the command line"), "{e}");
        std::fs::write(&path, "epochs = [\n").unwrap();
        assert!(read(&path).unwrap_err().to_string().contains("run.toml"));
        std::fs::write(&path, "likelihood = \"gausian\"\n").unwrap();
        let flags = read(&path).unwrap();
        let mut all = vec!["coordinator".to_string()];
        all.extend(flags);
        let e = Cli::try_parse_from(all).unwrap_err().to_string();
        assert!(e.contains("gausian"), "{e}");
    }
}

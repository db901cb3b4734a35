//! `model.safetensors` and training checkpoints: round trips, metadata, PyTorch compatibility,
//! and named errors (never panics) for damaged or mismatched files.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

use common::formats::Checkpoint;
use common::formats::fingerprint;
use common::formats::{LoadedModel, load_model, save_model};
use common::model::ParamLayout;
use common::model::{Likelihood, ModelConfig};
use common::optim::OptimizerConfig;
use safetensors::{Dtype, SafeTensors, tensor::TensorView};

/// Deterministic, varied parameters, including the values that distinguish bit-exact storage:
/// -0.0, subnormals, extremes.
fn params(n: usize) -> Vec<f32> {
    let mut p: Vec<f32> = (0..n)
        .map(|i| ((i as f32) * 0.618_034).sin() * 0.1)
        .collect();
    let special = [-0.0, f32::from_bits(1), f32::MAX, f32::MIN_POSITIVE, -1e-30];
    for (slot, value) in p.iter_mut().zip(special) {
        *slot = value;
    }
    p
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// input 6 -> hidden 4 -> latent 2: PyTorch names, tiny tensors.
fn small_config() -> ModelConfig {
    ModelConfig {
        input_dim: 6,
        hidden: vec![4],
        latent: 2,
        likelihood: Likelihood::Bernoulli,
    }
}

fn extra() -> BTreeMap<String, String> {
    BTreeMap::from([
        ("run_fingerprint".to_string(), "abc123".to_string()),
        ("epochs".to_string(), "10".to_string()),
        ("seed".to_string(), "42".to_string()),
    ])
}

/// Entries of `dir`, sorted.
fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Writes a safetensors file with arbitrary tensors `(name, dtype, shape, bytes)` and metadata,
/// using the reference `safetensors` writer, to build files this program would never write.
fn write_raw(
    path: &Path,
    tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)],
    metadata: &[(&str, &str)],
) {
    let views: Vec<(&str, TensorView<'_>)> = tensors
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            (
                *name,
                TensorView::new(*dtype, shape.clone(), bytes).unwrap(),
            )
        })
        .collect();
    let metadata: HashMap<String, String> = metadata
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    fs::write(path, safetensors::serialize(views, Some(metadata)).unwrap()).unwrap();
}

fn f32_bytes(n: usize) -> Vec<u8> {
    (0..n).flat_map(|i| (i as f32).to_le_bytes()).collect()
}

/// The small model's tensors as `write_raw` input, with `edit` applied to the list.
fn small_model_raw(
    dir: &Path,
    edit: impl FnOnce(&mut Vec<(&'static str, Dtype, Vec<usize>, Vec<u8>)>),
    config_json: &str,
) -> PathBuf {
    let mut tensors: Vec<(&'static str, Dtype, Vec<usize>, Vec<u8>)> = vec![
        ("fc1.weight", Dtype::F32, vec![4, 6], f32_bytes(24)),
        ("fc1.bias", Dtype::F32, vec![4], f32_bytes(4)),
        ("fc21.weight", Dtype::F32, vec![2, 4], f32_bytes(8)),
        ("fc21.bias", Dtype::F32, vec![2], f32_bytes(2)),
        ("fc22.weight", Dtype::F32, vec![2, 4], f32_bytes(8)),
        ("fc22.bias", Dtype::F32, vec![2], f32_bytes(2)),
        ("fc3.weight", Dtype::F32, vec![4, 2], f32_bytes(8)),
        ("fc3.bias", Dtype::F32, vec![4], f32_bytes(4)),
        ("fc4.weight", Dtype::F32, vec![6, 4], f32_bytes(24)),
        ("fc4.bias", Dtype::F32, vec![6], f32_bytes(6)),
    ];
    edit(&mut tensors);
    let path = dir.join("raw.safetensors");
    write_raw(&path, &tensors, &[("vae.model_config", config_json)]);
    path
}

fn small_config_json() -> String {
    serde_json::to_string(&small_config()).unwrap()
}

/// The error of loading `path`, as text; also checks that it names the file.
fn load_error(path: &Path) -> String {
    let err = load_model(path).unwrap_err().to_string();
    assert!(
        err.contains(&*path.file_name().unwrap().to_string_lossy()),
        "error does not name the file: {err}"
    );
    err
}

// ---------------------------------------------------------------------------------------------
// Model files

#[test]
fn model_round_trip_is_bit_identical() {
    let dir = tempfile::tempdir().unwrap();
    for config in [
        ModelConfig::default(),
        ModelConfig {
            input_dim: 10,
            hidden: vec![8, 5],
            latent: 3,
            likelihood: Likelihood::Gaussian { variance: 0.25 },
        },
        ModelConfig {
            hidden: vec![],
            ..small_config()
        },
    ] {
        let path = dir.path().join("model.safetensors");
        let p = params(ParamLayout::new(&config).len());
        save_model(&path, &config, &p, &extra()).unwrap();
        let LoadedModel {
            config: loaded_config,
            params: loaded,
            metadata,
        } = load_model(&path).unwrap();
        assert_eq!(loaded_config, config);
        assert_eq!(bits(&loaded), bits(&p), "{config:?}");
        assert_eq!(fingerprint(&loaded), fingerprint(&p));
        assert_eq!(metadata, extra());
    }
}

#[test]
fn default_model_has_pytorch_names_and_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    let config = ModelConfig::default();
    let p = params(ParamLayout::new(&config).len());
    save_model(&path, &config, &p, &BTreeMap::new()).unwrap();

    // Read with the reference safetensors reader, independently of our loader.
    let bytes = fs::read(&path).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let mut found: Vec<(String, Vec<usize>)> = file
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            assert_eq!(view.dtype(), Dtype::F32, "{name}");
            (name, view.shape().to_vec())
        })
        .collect();
    found.sort();
    let mut expected: Vec<(String, Vec<usize>)> = [
        ("fc1.weight", vec![400, 784]),
        ("fc1.bias", vec![400]),
        ("fc21.weight", vec![20, 400]),
        ("fc21.bias", vec![20]),
        ("fc22.weight", vec![20, 400]),
        ("fc22.bias", vec![20]),
        ("fc3.weight", vec![400, 20]),
        ("fc3.bias", vec![400]),
        ("fc4.weight", vec![784, 400]),
        ("fc4.bias", vec![784]),
    ]
    .into_iter()
    .map(|(n, s)| (n.to_string(), s))
    .collect();
    expected.sort();
    assert_eq!(found, expected);

    // Each tensor holds its slice of the flat vector: fc21.weight row 3 is params[fc21 + 3*400..].
    let layout = ParamLayout::new(&config);
    for t in layout.tensors() {
        let view = file.tensor(&t.name).unwrap();
        let values: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        assert_eq!(bits(&values), bits(&p[t.range.clone()]), "{}", t.name);
    }
}

#[test]
fn data_section_is_the_flat_vector_so_its_hash_is_the_fingerprint() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    let config = small_config();
    let p = params(ParamLayout::new(&config).len());
    save_model(&path, &config, &p, &BTreeMap::new()).unwrap();
    let bytes = fs::read(&path).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let data = &bytes[8 + header_len..];
    assert_eq!((8 + header_len) % 8, 0, "data must start 8-byte aligned");
    use sha2::Digest;
    assert_eq!(hex::encode(sha2::Sha256::digest(data)), fingerprint(&p));
}

#[test]
fn metadata_is_present_and_parseable() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    let config = ModelConfig {
        likelihood: Likelihood::Gaussian { variance: 0.5 },
        ..small_config()
    };
    let p = params(ParamLayout::new(&config).len());
    save_model(&path, &config, &p, &extra()).unwrap();

    let bytes = fs::read(&path).unwrap();
    let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
    let metadata = header.metadata().as_ref().expect("metadata present");
    let stored: ModelConfig = serde_json::from_str(&metadata["vae.model_config"]).unwrap();
    assert_eq!(stored, config);
    assert_eq!(metadata["vae.format_version"], "1");
    assert_eq!(metadata["vae.kind"], "model");
    assert_eq!(metadata["format"], "pt");
    assert_eq!(metadata["vae.fingerprint"], fingerprint(&p));
    for (k, v) in extra() {
        assert_eq!(metadata[&k], v);
    }
    assert_eq!(metadata.len(), 5 + extra().len());
}

#[test]
fn saving_twice_gives_identical_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let config = small_config();
    let p = params(ParamLayout::new(&config).len());
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    save_model(&a, &config, &p, &extra()).unwrap();
    save_model(&b, &config, &p, &extra()).unwrap();
    assert_eq!(fs::read(a).unwrap(), fs::read(b).unwrap());
}

#[test]
fn save_rejects_wrong_length_and_reserved_keys() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    let config = small_config();
    let n = ParamLayout::new(&config).len();

    let err = save_model(&path, &config, &vec![0.0; n + 1], &BTreeMap::new()).unwrap_err();
    assert!(
        err.to_string()
            .contains(&format!("{n} parameters but {}", n + 1)),
        "{err}"
    );

    for key in ["vae.model_config", "format", "vae.anything"] {
        let extra = BTreeMap::from([(key.to_string(), "x".to_string())]);
        let err = save_model(&path, &config, &vec![0.0; n], &extra).unwrap_err();
        assert!(err.to_string().contains(key), "{err}");
    }
    let bad = ModelConfig {
        latent: 0,
        ..small_config()
    };
    assert!(save_model(&path, &bad, &[], &BTreeMap::new()).is_err());
    assert!(!path.exists(), "failed saves must not write the file");
}

#[test]
fn truncated_or_garbage_files_are_named_errors() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.safetensors");
    let config = small_config();
    save_model(
        &good,
        &config,
        &params(ParamLayout::new(&config).len()),
        &extra(),
    )
    .unwrap();
    let bytes = fs::read(&good).unwrap();

    let path = dir.path().join("damaged.safetensors");
    for len in [0, 3, 8, 20, bytes.len() / 2, bytes.len() - 1] {
        fs::write(&path, &bytes[..len]).unwrap();
        let err = load_error(&path);
        assert!(
            err.contains("not a valid safetensors file"),
            "len {len}: {err}"
        );
    }
    fs::write(&path, b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!").unwrap();
    assert!(load_error(&path).contains("not a valid safetensors file"));
    // A huge declared header length must not allocate or panic.
    fs::write(&path, u64::MAX.to_le_bytes()).unwrap();
    load_error(&path);

    let err = load_model(&dir.path().join("missing.safetensors")).unwrap_err();
    assert!(err.to_string().contains("missing.safetensors"), "{err}");
}

#[test]
fn flipped_bit_in_the_data_is_caught_by_the_fingerprint() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    let config = small_config();
    save_model(
        &path,
        &config,
        &params(ParamLayout::new(&config).len()),
        &extra(),
    )
    .unwrap();
    let mut bytes = fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    fs::write(&path, bytes).unwrap();
    assert!(load_error(&path).contains("fingerprint"));
}

#[test]
fn wrong_shape_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let path = small_model_raw(
        dir.path(),
        |t| t[0] = ("fc1.weight", Dtype::F32, vec![6, 4], f32_bytes(24)),
        &small_config_json(),
    );
    let err = load_error(&path);
    assert!(
        err.contains("`fc1.weight` has shape [6, 4], expected [4, 6]"),
        "{err}"
    );

    // The same tensors under a configuration they do not fit.
    let other = ModelConfig {
        latent: 3,
        ..small_config()
    };
    let path = small_model_raw(dir.path(), |_| {}, &serde_json::to_string(&other).unwrap());
    let err = load_error(&path);
    assert!(
        err.contains("`fc21.weight` has shape [2, 4], expected [3, 4]"),
        "{err}"
    );
}

#[test]
fn wrong_dtype_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let path = small_model_raw(
        dir.path(),
        |t| t[1] = ("fc1.bias", Dtype::F64, vec![4], vec![0; 32]),
        &small_config_json(),
    );
    let err = load_error(&path);
    assert!(
        err.contains("`fc1.bias` has dtype F64, expected F32"),
        "{err}"
    );
}

#[test]
fn missing_and_unexpected_tensors_are_detected() {
    let dir = tempfile::tempdir().unwrap();
    let path = small_model_raw(dir.path(), |t| t.truncate(9), &small_config_json());
    let err = load_error(&path);
    assert!(err.contains("missing tensor `fc4.bias`"), "{err}");

    let path = small_model_raw(
        dir.path(),
        |t| t.push(("fc5.weight", Dtype::F32, vec![1], f32_bytes(1))),
        &small_config_json(),
    );
    let err = load_error(&path);
    assert!(err.contains("unexpected tensor `fc5.weight`"), "{err}");
}

#[test]
fn a_file_written_by_the_reference_writer_loads() {
    // Another program (e.g. Python's safetensors) may order tensors differently and omit the
    // fingerprint and version: only the configuration is required.
    let dir = tempfile::tempdir().unwrap();
    let path = small_model_raw(dir.path(), |_| {}, &small_config_json());
    let loaded = load_model(&path).unwrap();
    assert_eq!(loaded.config, small_config());
    let layout = ParamLayout::new(&small_config());
    let fc4 = layout.tensors().pop().unwrap();
    assert_eq!(&loaded.params[fc4.range], &[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
    assert!(loaded.metadata.is_empty());
}

#[test]
fn missing_or_invalid_config_metadata_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("raw.safetensors");
    write_raw(
        &path,
        &[("fc1.bias", Dtype::F32, vec![4], f32_bytes(4))],
        &[],
    );
    assert!(load_error(&path).contains("no `vae.model_config` metadata"));

    let path = small_model_raw(dir.path(), |_| {}, "{\"input_dim\": 6");
    assert!(load_error(&path).contains("not a valid model configuration"));

    let bad = ModelConfig {
        hidden: vec![0],
        ..small_config()
    };
    let path = small_model_raw(dir.path(), |_| {}, &serde_json::to_string(&bad).unwrap());
    assert!(load_error(&path).contains("hidden layer 0 has size 0"));

    write_raw(
        &path,
        &[("fc1.bias", Dtype::F32, vec![4], f32_bytes(4))],
        &[
            ("vae.model_config", &small_config_json()),
            ("vae.format_version", "2"),
        ],
    );
    assert!(load_error(&path).contains("format version `2` is not supported"));
}

// ---------------------------------------------------------------------------------------------
// Checkpoints

fn checkpoint(optimizer: OptimizerConfig, n: usize, steps: u64) -> Checkpoint {
    let mut params = params(n);
    let mut state = optimizer.init_state(n);
    for t in 0..steps {
        let grad: Vec<f32> = (0..n).map(|i| ((i as u64 + t) as f32).cos()).collect();
        optimizer.step(&mut params, &grad, &mut state).unwrap();
    }
    Checkpoint {
        params,
        optimizer,
        optimizer_state: state,
        global_step: steps,
        epoch: 3,
        step_in_epoch: 7,
        run_config_json: r#"{"seed": 42, "shards": 16, "note": "ünïcødé \"quoted\""}"#.to_string(),
        metrics_history: vec![
            r#"{"step":1,"elbo":-543.2}"#.to_string(),
            "{\"step\":2,\n\"elbo\":-500.1}".to_string(),
        ],
    }
}

#[test]
fn checkpoint_round_trip_is_exact() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("checkpoint.safetensors");
    // 150,001 values: the tensors are streamed to the file in pieces of 65,536, and the last
    // piece of each is shorter.
    for (optimizer, steps, n) in [
        (OptimizerConfig::default(), 3, 1000),
        (OptimizerConfig::default(), 2, 150_001),
        (OptimizerConfig::default(), 0, 1000),
        (OptimizerConfig::sgd(0.1, 0.9), 2, 1000),
        (OptimizerConfig::sgd(0.1, 0.9), 0, 1000),
        (OptimizerConfig::sgd(0.1, 0.0), 4, 1000),
    ] {
        let original = checkpoint(optimizer, n, steps);
        original.save(&path).unwrap();
        let loaded = Checkpoint::load(&path).unwrap();
        assert_eq!(bits(&loaded.params), bits(&original.params));
        assert_eq!(loaded, original);

        // Resuming gives the same bits as never stopping.
        let grad = vec![0.25_f32; n];
        let (mut a, mut b) = (original.clone(), loaded);
        a.optimizer
            .step(&mut a.params, &grad, &mut a.optimizer_state)
            .unwrap();
        b.optimizer
            .step(&mut b.params, &grad, &mut b.optimizer_state)
            .unwrap();
        assert_eq!(bits(&a.params), bits(&b.params));
    }
    assert_eq!(entries(dir.path()), ["checkpoint.safetensors"]);
}

#[test]
fn checkpoint_metadata_is_readable_without_this_program() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("checkpoint.safetensors");
    // Longer than one piece of the streamed write (65,536 values).
    let original = checkpoint(OptimizerConfig::default(), 70_000, 2);
    original.save(&path).unwrap();
    let bytes = fs::read(&path).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let mut names = file.names();
    names.sort();
    assert_eq!(
        names,
        ["optimizer.exp_avg", "optimizer.exp_avg_sq", "params"]
    );
    let le_bytes =
        |values: &[f32]| -> Vec<u8> { values.iter().flat_map(|v| v.to_le_bytes()).collect() };
    assert_eq!(
        file.tensor("params").unwrap().data(),
        le_bytes(&original.params)
    );
    let buffers = original.optimizer_state.buffers();
    assert_eq!(
        file.tensor("optimizer.exp_avg_sq").unwrap().data(),
        le_bytes(buffers[1].1)
    );
    let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
    let metadata = header.metadata().as_ref().unwrap();
    assert_eq!(metadata["vae.kind"], "checkpoint");
    assert_eq!(metadata["vae.run_config"], original.run_config_json);
    let state: serde_json::Value = serde_json::from_str(&metadata["vae.checkpoint"]).unwrap();
    assert_eq!(state["global_step"], 2);
    assert_eq!(state["optimizer"]["kind"], "adam");
    let metrics: Vec<String> = serde_json::from_str(&metadata["vae.metrics_history"]).unwrap();
    assert_eq!(metrics, original.metrics_history);
}

#[test]
fn damaged_checkpoints_are_named_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("checkpoint.safetensors");
    checkpoint(OptimizerConfig::default(), 100, 2)
        .save(&path)
        .unwrap();
    let bytes = fs::read(&path).unwrap();

    let damaged = dir.path().join("damaged.safetensors");
    for len in [0, 8, bytes.len() - 100, bytes.len() - 1] {
        fs::write(&damaged, &bytes[..len]).unwrap();
        let err = Checkpoint::load(&damaged).unwrap_err().to_string();
        assert!(err.contains("damaged.safetensors"), "{err}");
        assert!(err.contains("not a valid safetensors file"), "{err}");
    }

    // Data section: params, then exp_avg, then exp_avg_sq (100 f32 each). Flip a bit in each.
    for (offset_from_end, tensor) in [
        (1, "optimizer.exp_avg_sq"),
        (401, "optimizer.exp_avg"),
        (801, "params"),
    ] {
        let mut corrupt = bytes.clone();
        let at = corrupt.len() - offset_from_end;
        corrupt[at] ^= 0x40;
        fs::write(&damaged, corrupt).unwrap();
        let err = Checkpoint::load(&damaged).unwrap_err().to_string();
        assert!(err.contains(&format!("tensor `{tensor}`")), "{err}");
        assert!(err.contains("corrupt"), "{err}");
    }
}

#[test]
fn models_and_checkpoints_are_not_confused() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("checkpoint.safetensors");
    checkpoint(OptimizerConfig::default(), 10, 1)
        .save(&ckpt)
        .unwrap();
    let err = load_model(&ckpt).unwrap_err().to_string();
    assert!(
        err.contains("this is a checkpoint file, not a model file"),
        "{err}"
    );

    let model = dir.path().join("model.safetensors");
    let config = small_config();
    save_model(
        &model,
        &config,
        &params(ParamLayout::new(&config).len()),
        &extra(),
    )
    .unwrap();
    let err = Checkpoint::load(&model).unwrap_err().to_string();
    assert!(
        err.contains("this is a model file, not a checkpoint file"),
        "{err}"
    );
}

#[test]
fn checkpoint_with_mismatched_state_is_not_saved() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("checkpoint.safetensors");
    let mut c = checkpoint(OptimizerConfig::default(), 10, 1);
    c.optimizer_state = OptimizerConfig::default().init_state(11);
    let err = c.save(&path).unwrap_err().to_string();
    assert!(err.contains("exp_avg"), "{err}");
    c.optimizer_state = OptimizerConfig::sgd(0.1, 0.0).init_state(10);
    assert!(c.save(&path).is_err());
    assert!(entries(dir.path()).is_empty());
}

#[test]
fn atomic_writes_leave_no_temporary_files() {
    let dir = tempfile::tempdir().unwrap();
    let config = small_config();
    let n = ParamLayout::new(&config).len();
    for i in 0..5 {
        save_model(
            &dir.path().join("model.safetensors"),
            &config,
            &vec![i as f32; n],
            &extra(),
        )
        .unwrap();
        checkpoint(OptimizerConfig::default(), n, i)
            .save(&dir.path().join("checkpoint.safetensors"))
            .unwrap();
    }
    assert_eq!(
        entries(dir.path()),
        ["checkpoint.safetensors", "model.safetensors"]
    );
    assert_eq!(
        load_model(&dir.path().join("model.safetensors"))
            .unwrap()
            .params,
        vec![4.0; n]
    );
}

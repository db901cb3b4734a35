//! The fuzz corpora of `common`'s parsers (`fuzz/corpus/{idx,npy,gzip,model_file,
//! checkpoint_file}`), replayed on the stable toolchain through the very functions the fuzz
//! targets call (`fuzz/src/files.rs`), each target in a child process whose peak memory is
//! bounded. A regression in a parser that the fuzzers once found (every fix left its input in the
//! corpus) fails here without nightly or libFuzzer. docs/fuzzing.md says how the corpora were made.
//!
//! `cargo test -p common --test fuzz_corpora -- --ignored write_seed_corpora` rewrites the
//! hand-made seeds (`seed-*` files) from this program's own writers.

#[path = "../../fuzz/src/files.rs"]
mod files;
#[path = "support/peak_memory.rs"]
mod peak_memory;

use peak_memory::replay_corpus;

/// Peak resident memory a whole corpus may add (the largest input is 64 KiB; the gzip target's
/// cap 1 MiB).
const RSS_MIB: u64 = 64;
/// Peak address space it may add: anything allocated from a size read in a header, even if never
/// touched, would show here.
const VIRTUAL_MIB: u64 = 256;

#[test]
fn replay_idx_corpus() {
    replay_corpus("replay_idx_corpus", "idx", files::idx, RSS_MIB, VIRTUAL_MIB);
}

#[test]
fn replay_npy_corpus() {
    replay_corpus("replay_npy_corpus", "npy", files::npy, RSS_MIB, VIRTUAL_MIB);
}

#[test]
fn replay_gzip_corpus() {
    replay_corpus(
        "replay_gzip_corpus",
        "gzip",
        files::gzip,
        RSS_MIB,
        VIRTUAL_MIB,
    );
}

#[test]
fn replay_model_file_corpus() {
    replay_corpus(
        "replay_model_file_corpus",
        "model_file",
        files::model_file,
        RSS_MIB,
        VIRTUAL_MIB,
    );
}

#[test]
fn replay_checkpoint_file_corpus() {
    replay_corpus(
        "replay_checkpoint_file_corpus",
        "checkpoint_file",
        files::checkpoint_file,
        RSS_MIB,
        VIRTUAL_MIB,
    );
}

/// The hand-made seeds: small valid inputs of every format, written by this program's writers
/// (or byte by byte where it has none), each checked to load.
#[test]
#[ignore = "writes fuzz/corpus/*/seed-*; run by hand when the formats change"]
fn write_seed_corpora() {
    use std::collections::BTreeMap;
    use std::io::Write;

    use common::formats::{Checkpoint, save_model};
    use common::model::{Likelihood, ModelConfig, ParamLayout};
    use common::optim::OptimizerConfig;

    let write = |target: &str, name: &str, bytes: &[u8]| {
        let dir = peak_memory::corpus_dir(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("seed-{name}")), bytes).unwrap();
    };
    let gzip = |bytes: &[u8]| {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(bytes).unwrap();
        e.finish().unwrap()
    };
    let idx = |magic: u32, dims: &[u32], data: &[u8]| {
        let mut out = magic.to_be_bytes().to_vec();
        for d in dims {
            out.extend(d.to_be_bytes());
        }
        out.extend(data);
        out
    };
    let npy = |major: u8, descr: &str, shape: &str, data: &[u8]| {
        let dict = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
        let prefix = if major == 1 { 10 } else { 12 };
        let mut header = dict.into_bytes();
        while (prefix + header.len() + 1) % 64 != 0 {
            header.push(b' ');
        }
        header.push(b'\n');
        let mut out = b"\x93NUMPY".to_vec();
        out.extend([major, 0]);
        if major == 1 {
            out.extend((header.len() as u16).to_le_bytes());
        } else {
            out.extend((header.len() as u32).to_le_bytes());
        }
        out.extend(header);
        out.extend(data);
        out
    };
    // An input with images only, or images and labels (see `split` in fuzz/src/files.rs).
    let pair = |images: &[u8], labels: Option<&[u8]>| match labels {
        None => [&[0u8][..], images].concat(),
        Some(labels) => {
            let at = (images.len() as u16).to_le_bytes();
            [&[1u8][..], &at[..], images, labels].concat()
        }
    };

    // IDX: two 2 x 3 images and their labels.
    let images = idx(
        0x803,
        &[2, 2, 3],
        &[0, 51, 102, 153, 204, 255, 1, 2, 3, 4, 5, 6],
    );
    let labels = idx(0x801, &[2], &[7, 3]);
    write("idx", "images", &pair(&images, None));
    write("idx", "images-labels", &pair(&images, Some(&labels)));
    write(
        "idx",
        "gzipped",
        &pair(&gzip(&images), Some(&gzip(&labels))),
    );

    // npy: uint8 [2, 2, 3], float32 [2, 4], float64 [2, 2, 2], labels of each integer type.
    let u8_images = npy(
        1,
        "|u1",
        "(2, 2, 3)",
        &[0, 51, 102, 153, 204, 255, 1, 2, 3, 4, 5, 6],
    );
    let f32_data: Vec<u8> = (0..8)
        .flat_map(|i| (i as f32 / 8.0).to_le_bytes())
        .collect();
    let f32_images = npy(1, "<f4", "(2, 4)", &f32_data);
    let f64_data: Vec<u8> = (0..8)
        .flat_map(|i| (i as f64 / 8.0).to_le_bytes())
        .collect();
    let f64_images = npy(2, "<f8", "(2, 2, 2)", &f64_data);
    let u8_labels = npy(1, "|u1", "(2,)", &[1, 2]);
    let i32_labels = npy(1, "<i4", "(2,)", &[1, 0, 0, 0, 9, 0, 0, 0]);
    let i64_labels = npy(
        3,
        "<i8",
        "(2,)",
        &[[5, 0, 0, 0, 0, 0, 0, 0], [0; 8]].concat(),
    );
    write("npy", "u8", &pair(&u8_images, Some(&u8_labels)));
    write("npy", "f32", &pair(&f32_images, Some(&i32_labels)));
    write("npy", "f64-v2", &pair(&f64_images, Some(&i64_labels)));
    write(
        "npy",
        "gzipped",
        &pair(&gzip(&f32_images), Some(&gzip(&u8_labels))),
    );

    // gzip: a stream (and two members) for the capped decoder; gzipped IDX and npy through the
    // loaders; plain IDX and npy to be gzipped by the target.
    let members = [gzip(b"first member "), gzip(&[0u8; 2000])].concat();
    write(
        "gzip",
        "stream",
        &[&[0u8][..], &gzip(b"some bytes, some bytes")].concat(),
    );
    write("gzip", "members", &[&[0u8][..], &members].concat());
    write("gzip", "idx", &[&[1u8][..], &gzip(&images)].concat());
    write("gzip", "npy", &[&[2u8][..], &gzip(&u8_images)].concat());
    write("gzip", "plain-idx", &[&[3u8][..], &images].concat());
    write("gzip", "plain-npy", &[&[3u8][..], &f32_images].concat());

    // Models: the one-hidden-layer (PyTorch names) and a deeper one, small.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    let models = [
        (
            "pytorch-names",
            ModelConfig {
                input_dim: 6,
                hidden: vec![4],
                latent: 2,
                likelihood: Likelihood::Bernoulli,
            },
        ),
        (
            "deeper-gaussian",
            ModelConfig {
                input_dim: 5,
                hidden: vec![3, 2],
                latent: 1,
                likelihood: Likelihood::Gaussian { variance: 0.25 },
            },
        ),
    ];
    for (name, config) in models {
        let n = ParamLayout::new(&config).len();
        let params: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
        let extra = BTreeMap::from([("epochs".to_string(), "3".to_string())]);
        save_model(&path, &config, &params, &extra).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        files::model_file(&bytes);
        common::formats::load_model_from_bytes(&path, bytes.clone()).unwrap();
        write("model_file", name, &bytes);
    }

    // Checkpoints: Adam after two steps, SGD with momentum after one, plain SGD.
    let path = dir.path().join("checkpoint.safetensors");
    for (name, optimizer, steps) in [
        ("adam", OptimizerConfig::adam(1e-3), 2),
        ("sgd-momentum", OptimizerConfig::sgd(0.1, 0.9), 1),
        ("sgd", OptimizerConfig::sgd(0.1, 0.0), 1),
    ] {
        let n = 7;
        let mut params: Vec<f32> = (0..n).map(|i| i as f32 / 7.0).collect();
        let mut state = optimizer.init_state(n);
        for t in 0..steps {
            let grad: Vec<f32> = (0..n).map(|i| ((i + t) as f32).cos()).collect();
            optimizer.step(&mut params, &grad, &mut state).unwrap();
        }
        Checkpoint {
            params,
            optimizer,
            optimizer_state: state,
            global_step: steps as u64,
            epoch: 1,
            step_in_epoch: 2,
            run_config_json: r#"{"seed":1}"#.to_string(),
            metrics_history: vec![r#"{"epoch":0,"train_elbo":-100.5}"#.to_string()],
        }
        .save(&path)
        .unwrap();
        let bytes = std::fs::read(&path).unwrap();
        Checkpoint::from_bytes(&path, bytes.clone()).unwrap();
        write("checkpoint_file", name, &bytes);
    }

    // Every seed loads (images and labels; gzipped or not).
    for (target, load) in [
        ("idx", common::data::idx_from_bytes as files::Loader),
        ("npy", common::data::npy_from_bytes as files::Loader),
    ] {
        for entry in std::fs::read_dir(peak_memory::corpus_dir(target)).unwrap() {
            let path = entry.unwrap().path();
            if path
                .file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("seed-")
            {
                let bytes = std::fs::read(&path).unwrap();
                let (images, labels) = files::split(&bytes).unwrap();
                files::load_data(images, labels, load)
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            }
        }
    }
}

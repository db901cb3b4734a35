//! Hostile files get clear errors within a stated memory bound (issue 10): model files whose
//! header or configuration states sizes far beyond the bytes they hold (`--init-from`,
//! `evaluate`), and gzip bombs given as data (`--data idx:...`, `npy:...`).
//!
//! Each case runs in a child process (this binary again, one test, one thread) that measures its
//! own peak resident memory (`VmHWM`) and peak address space (`VmPeak`, which also counts memory
//! allocated but never touched) before and after; the bounds are below. The bombs are generated
//! here by streaming zeros through flate2, so the repository holds no large file.

#[path = "support/peak_memory.rs"]
mod peak_memory;

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use common::data::{GZIP_MAX_ENV, load_idx, load_npy};
use common::formats::{Checkpoint, load_model};
use peak_memory::bounded_in_child;

/// Peak resident memory any case may add: 64 MiB (the bombs expand to 1 GiB).
const RSS_MIB: u64 = 64;
/// Peak address space any case may add: 256 MiB (the model files claim up to 2^64 bytes).
const VIRTUAL_MIB: u64 = 256;

/// A safetensors file: `header` (JSON) padded to 8 bytes, then `data`.
fn safetensors(header: &str, data: &[u8]) -> Vec<u8> {
    let mut header = header.as_bytes().to_vec();
    header.resize(header.len().next_multiple_of(8), b' ');
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend(header);
    out.extend(data);
    out
}

/// A model file whose configuration is `config` but which holds one tensor of one value.
fn model_with_config(config: &str) -> Vec<u8> {
    let config = serde_json::to_string(config).unwrap();
    safetensors(
        &format!(
            r#"{{"__metadata__":{{"format":"pt","vae.kind":"model","vae.model_config":{config}}},
            "fc1.weight":{{"dtype":"F32","shape":[1,1],"data_offsets":[0,4]}}}}"#
        ),
        &1.0f32.to_le_bytes(),
    )
}

/// The load error of `bytes` saved as `name`, checked to name the file and to contain `expect`.
fn refused(dir: &Path, name: &str, bytes: &[u8], expect: &str) {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    let start = Instant::now();
    let error = if name.starts_with("checkpoint") {
        Checkpoint::load(&path).map(|_| ()).unwrap_err()
    } else {
        load_model(&path).map(|_| ()).unwrap_err()
    };
    assert_clear_error(
        name,
        bytes.len(),
        &error.to_string(),
        start.elapsed(),
        expect,
    );
}

/// Prints the refusal with its time and the peak memory so far; it must name the file `name` and
/// contain `expect`.
fn assert_clear_error(
    name: &str,
    len: usize,
    message: &str,
    elapsed: std::time::Duration,
    expect: &str,
) {
    let (rss, _) = peak_memory::peaks_kib();
    println!(
        "{name} ({len} bytes): {message} ({elapsed:.0?}; peak resident so far {} MiB)",
        rss / 1024
    );
    assert!(
        message.contains(name),
        "the error does not name the file: {message}"
    );
    assert!(
        message.contains(expect),
        "expected `{expect}` in: {message}"
    );
}

#[test]
fn hostile_model_files_get_clear_errors_within_the_memory_bound() {
    bounded_in_child(
        "hostile_model_files_get_clear_errors_within_the_memory_bound",
        RSS_MIB,
        VIRTUAL_MIB,
        || {
            let dir = tempfile::tempdir().unwrap();
            let dir = dir.path();
            // A configuration of 10^9 x 1 + ... parameters (4 GB), with one value in the file:
            // used to allocate the 4 GB before looking at the tensors.
            refused(
                dir,
                "huge-layer.safetensors",
                &model_with_config(
                    r#"{"input_dim":1000000000,"hidden":[1],"latent":1,"likelihood":{"kind":"bernoulli"}}"#,
                ),
                "has shape [1, 1], expected [1, 1000000000]",
            );
            // 2^32 x 2^32 parameters: the layout's sizes overflow (a panic in debug builds).
            refused(
                dir,
                "overflowing-layer.safetensors",
                &model_with_config(
                    r#"{"input_dim":4294967296,"hidden":[4294967296],"latent":1,"likelihood":{"kind":"bernoulli"}}"#,
                ),
                "more parameters than this machine can address",
            );
            // 300,000 hidden layers in 600 kB of JSON: the layout alone would take ~100 MB.
            let hidden = vec!["1"; 300_000].join(",");
            refused(
                dir,
                "many-layers.safetensors",
                &model_with_config(&format!(
                    r#"{{"input_dim":1,"hidden":[{hidden}],"latent":1,"likelihood":{{"kind":"bernoulli"}}}}"#
                )),
                "300000 hidden layers, far more than the file's 1 tensors",
            );
            // A tensor of 2^38 values (1 TiB) in a 100-byte file: offsets past the end.
            refused(
                dir,
                "past-the-end.safetensors",
                &safetensors(
                    r#"{"fc1.weight":{"dtype":"F32","shape":[274877906944],"data_offsets":[0,1099511627776]}}"#,
                    &[0; 16],
                ),
                "the tensors' data ends at byte 1099511627776 but 16 bytes follow the header",
            );
            // Shapes whose element count overflows.
            refused(
                dir,
                "overflowing-shape.safetensors",
                &safetensors(
                    r#"{"fc1.weight":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,0]}}"#,
                    &[],
                ),
                "does not fill its 0 bytes",
            );
            // Offsets whose sum is near 2^64: the safetensors crate's own reader (0.8.0) overflows
            // on these (a panic in debug builds).
            let big = 1u64 << 60;
            let mut tensors: Vec<String> = (0..15)
                .map(|i| {
                    format!(
                        r#""t{i}":{{"dtype":"U8","shape":[{big}],"data_offsets":[{},{}]}}"#,
                        i * big,
                        (i + 1) * big
                    )
                })
                .collect();
            tensors.push(format!(
                r#""t15":{{"dtype":"U8","shape":[{}],"data_offsets":[{},{}]}}"#,
                u64::MAX - 15 * big,
                15 * big,
                u64::MAX
            ));
            refused(
                dir,
                "offsets-near-2^64.safetensors",
                &safetensors(&format!("{{{}}}", tensors.join(",")), &[]),
                "not a valid safetensors file",
            );
            // A header length of 2^63 and one of 99 MB in a small file.
            let mut huge_header = (1u64 << 63).to_le_bytes().to_vec();
            huge_header.extend(b"{}");
            refused(
                dir,
                "huge-header.safetensors",
                &huge_header,
                "more than the 100000000 allowed",
            );
            let mut long_header = 99_000_000u64.to_le_bytes().to_vec();
            long_header.extend(b"{}      ");
            refused(
                dir,
                "long-header.safetensors",
                &long_header,
                "only 8 bytes follow its length",
            );
            // A shape of a million dimensions, and 70,000 tiny tensors.
            let rank = vec!["1"; 1_000_000].join(",");
            refused(
                dir,
                "high-rank.safetensors",
                &safetensors(
                    &format!(r#"{{"x":{{"dtype":"F32","shape":[{rank}],"data_offsets":[0,4]}}}}"#),
                    &[0; 4],
                ),
                "more than 8 dimensions",
            );
            let many: Vec<String> = (0..70_000)
                .map(|i| format!(r#""{i}":{{"dtype":"U8","shape":[0],"data_offsets":[0,0]}}"#))
                .collect();
            refused(
                dir,
                "many-tensors.safetensors",
                &safetensors(&format!("{{{}}}", many.join(",")), &[]),
                "more than 65536 tensors",
            );
            // A checkpoint whose `params` claims 2^36 values.
            refused(
                dir,
                "checkpoint-huge-params.safetensors",
                &safetensors(
                    r#"{"params":{"dtype":"F32","shape":[68719476736],"data_offsets":[0,274877906944]}}"#,
                    &[0; 64],
                ),
                "not a valid safetensors file",
            );
        },
    );
}

/// A gzip member of `n` zero bytes, compressed as they stream (1 GiB becomes about 1 MB).
fn gzipped_zeros(n: usize) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..n / zeros.len() {
        encoder.write_all(&zeros).unwrap();
    }
    encoder.write_all(&zeros[..n % zeros.len()]).unwrap();
    encoder.finish().unwrap()
}

/// A gzip member of `bytes`.
fn gzipped(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

fn idx_header(magic: u32, dims: &[u32]) -> Vec<u8> {
    let mut out = magic.to_be_bytes().to_vec();
    for d in dims {
        out.extend(d.to_be_bytes());
    }
    out
}

/// Loads `bytes` saved as `name` with `load`; the error must name the file and contain `expect`.
fn bomb_refused(
    dir: &Path,
    name: &str,
    bytes: &[u8],
    load: fn(&Path, Option<&Path>) -> common::Result<common::data::Dataset>,
    expect: &str,
) {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    let start = Instant::now();
    let message = load(&path, None).unwrap_err().to_string();
    let elapsed = start.elapsed();
    assert_clear_error(name, bytes.len(), &message, elapsed, expect);
    // Generous for a shared machine: each stops within 1 MB of output (milliseconds here).
    assert!(elapsed.as_secs() < 10, "{name} took {elapsed:?}");
}

#[test]
fn gzip_bombs_get_clear_errors_within_the_memory_bound() {
    bounded_in_child(
        "gzip_bombs_get_clear_errors_within_the_memory_bound",
        RSS_MIB,
        VIRTUAL_MIB,
        || {
            let dir = tempfile::tempdir().unwrap();
            let dir = dir.path();
            // 1 GiB of zeros (about 1 MB compressed), reused after each header below: gzip
            // members concatenate.
            let bomb = gzipped_zeros(1 << 30);
            assert!(bomb.len() < 2 << 20, "{}", bomb.len());
            // Bare: the magic number (0) is wrong after the first 64 KiB.
            bomb_refused(dir, "zeros.gz", &bomb, load_idx, "magic number 0");
            // A valid header promising ten 28 x 28 images, then the gigabyte.
            let ten = [gzipped(&idx_header(0x803, &[10, 28, 28])), bomb.clone()].concat();
            bomb_refused(
                dir,
                "ten-images.gz",
                &ten,
                load_idx,
                "decompresses to more than the 7856 bytes its header declares",
            );
            // A header promising 2^40 bytes: refused before any data is decompressed.
            let huge = [
                gzipped(&idx_header(0x803, &[1 << 20, 1 << 10, 1 << 10])),
                bomb.clone(),
            ]
            .concat();
            bomb_refused(
                dir,
                "huge-header.gz",
                &huge,
                load_idx,
                "declares 1099511627792 bytes (1048576.0 MiB) of data once decompressed, more \
                 than the 4294967296 bytes (4096.0 MiB) cap",
            );
            // The same with a `.npy` header: 10 x 784 uint8.
            let dict = "{'descr': '|u1', 'fortran_order': False, 'shape': (10, 784), }";
            let mut npy = b"\x93NUMPY\x01\x00".to_vec();
            npy.extend((dict.len() as u16).to_le_bytes());
            npy.extend(dict.as_bytes());
            let npy_bomb = [gzipped(&npy), bomb.clone()].concat();
            bomb_refused(
                dir,
                "ten-images.npy.gz",
                &npy_bomb,
                load_npy,
                &format!(
                    "more than the {} bytes its header declares",
                    10 + dict.len() + 7840
                ),
            );
            // Format-less: the absolute cap (16 MiB here) stops it.
            let message = common::data::gunzip_capped(Path::new("raw.gz"), &bomb, 16 << 20)
                .unwrap_err()
                .to_string();
            println!("raw.gz: {message}");
            assert!(
                message.starts_with("raw.gz: ")
                    && message.contains("more than the 16777216 bytes (16.0 MiB) cap")
                    && message.contains(GZIP_MAX_ENV),
                "{message}"
            );
        },
    );
}

/// `VAE_GZIP_MAX_BYTES` lowers (or raises) the absolute cap; a value that is not a number is an
/// error naming the variable.
#[test]
fn the_gzip_cap_comes_from_the_environment() {
    const TEST: &str = "the_gzip_cap_comes_from_the_environment";
    if let Ok(cap) = std::env::var(GZIP_MAX_ENV) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("images.gz");
        let images = [idx_header(0x803, &[2, 28, 28]), vec![7; 2 * 784]].concat();
        std::fs::write(&path, gzipped(&images)).unwrap();
        let result = load_idx(&path, None);
        match cap.as_str() {
            "1000" => {
                let message = result.unwrap_err().to_string();
                assert!(
                    message.contains("more than the 1000 bytes cap"),
                    "{message}"
                );
            }
            "2000" => assert_eq!(result.unwrap().len(), 2),
            _ => {
                let message = result.unwrap_err().to_string();
                assert!(message.contains("is not a number of bytes"), "{message}");
            }
        }
        return;
    }
    for cap in ["1000", "2000", "lots"] {
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args([TEST, "--exact", "--test-threads=1"])
            .env(GZIP_MAX_ENV, cap)
            .status()
            .unwrap();
        assert!(status.success(), "{GZIP_MAX_ENV}={cap}");
    }
}

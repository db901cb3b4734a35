//! Fuzz targets over files a user hands the program: IDX and `.npy` data (raw or gzipped), gzip
//! streams, `model.safetensors` and `checkpoint.safetensors`. Compiled into the fuzz crate and,
//! through a `#[path]` module, into `common/tests/fuzz_corpora.rs`.

use std::io::{Read, Write};
use std::path::Path;

use common::data::{Dataset, gunzip_capped, idx_from_bytes, npy_from_bytes};
use common::formats::{Checkpoint, load_model_from_bytes};
use common::model::ParamLayout;

/// The cap the `gzip` target's format-less path decompresses within.
pub const GZIP_TARGET_CAP: u64 = 1 << 20;

const IMAGES: &str = "images.data";
const LABELS: &str = "labels.data";

/// Splits an input into an image file and, optionally, a label file. The first byte chooses:
/// even, images only; odd, the next two bytes (little-endian) say where the label file starts.
pub fn split(data: &[u8]) -> Option<(&[u8], Option<&[u8]>)> {
    let (&first, rest) = data.split_first()?;
    if first & 1 == 0 {
        return Some((rest, None));
    }
    let (at, rest) = rest.split_first_chunk::<2>()?;
    let at = usize::from(u16::from_le_bytes(*at)).min(rest.len());
    Some((&rest[..at], Some(&rest[at..])))
}

/// `idx_from_bytes` or `npy_from_bytes`.
pub type Loader = fn(&Path, Vec<u8>, Option<(&Path, Vec<u8>)>) -> common::Result<Dataset>;

/// Loads images (and labels) with `load`, checks the result, and returns it.
pub fn load_data(images: &[u8], labels: Option<&[u8]>, load: Loader) -> common::Result<Dataset> {
    let result = load(
        Path::new(IMAGES),
        images.to_vec(),
        labels.map(|l| (Path::new(LABELS), l.to_vec())),
    );
    match &result {
        Ok(data) => {
            assert!(!data.is_empty());
            let (h, w) = data.image_shape();
            assert_eq!(h * w, data.dim());
            assert_eq!(data.pixels().len(), data.len() * data.dim());
            if let Some(labels) = &data.labels {
                assert_eq!(labels.len(), data.len());
            }
        }
        Err(e) => {
            let message = e.to_string();
            assert!(
                message.contains(IMAGES) || message.contains(LABELS),
                "the error does not name the file: {message}"
            );
        }
    }
    result
}

/// `idx`: an IDX image file and optionally a label file (see [`split`]), raw or gzipped.
pub fn idx(data: &[u8]) {
    if let Some((images, labels)) = split(data) {
        let _ = load_data(images, labels, idx_from_bytes);
    }
}

/// `npy`: a `.npy` image file and optionally a label file (see [`split`]), raw or gzipped.
pub fn npy(data: &[u8]) {
    if let Some((images, labels)) = split(data) {
        let _ = load_data(images, labels, npy_from_bytes);
    }
}

/// `gzip`: the first byte chooses a mode, the rest is the input.
///
/// - 0: the rest as a gzip stream through [`gunzip_capped`] with a 1 MiB cap; compared with
///   flate2 reading at most one byte past the cap: the same bytes when those fit in the cap, an
///   error otherwise.
/// - 1, 2: the rest as an IDX / `.npy` image file (gzipped or not) through the loaders, whose
///   decompression stops at the header's declared length.
/// - 3: the rest gzipped (a valid stream of arbitrary content), loaded as IDX and as `.npy`:
///   the same outcome and the same pixels as the rest loaded uncompressed.
pub fn gzip(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 4 {
        0 => {
            let ours = gunzip_capped(Path::new(IMAGES), rest, GZIP_TARGET_CAP);
            let mut reference = Vec::new();
            let reference = flate2::read::MultiGzDecoder::new(rest)
                .take(GZIP_TARGET_CAP + 1)
                .read_to_end(&mut reference)
                .map(|_| reference);
            match (ours, reference) {
                (Ok(ours), Ok(reference)) => assert_eq!(ours, reference),
                (Err(e), Ok(reference)) => {
                    assert!(reference.len() as u64 > GZIP_TARGET_CAP, "{e}");
                    assert!(e.to_string().contains(IMAGES), "{e}");
                }
                (Ok(ours), Err(e)) => panic!("{} bytes where flate2 says {e}", ours.len()),
                (Err(e), Err(_)) => assert!(e.to_string().contains(IMAGES), "{e}"),
            }
        }
        1 => {
            let _ = load_data(rest, None, idx_from_bytes);
        }
        2 => {
            let _ = load_data(rest, None, npy_from_bytes);
        }
        // Content that is itself gzip would be decompressed once more when loaded uncompressed.
        _ if rest.starts_with(&[0x1f, 0x8b]) => {}
        _ => {
            let mut encoder =
                flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            encoder.write_all(rest).expect("writing to memory");
            let packed = encoder.finish().expect("writing to memory");
            for load in [idx_from_bytes as Loader, npy_from_bytes] {
                let plain = load_data(rest, None, load);
                let unpacked = load_data(&packed, None, load);
                match (plain, unpacked) {
                    (Ok(a), Ok(b)) => {
                        assert_eq!(a.image_shape(), b.image_shape());
                        let bits = |d: &Dataset| {
                            d.pixels().iter().map(|x| x.to_bits()).collect::<Vec<_>>()
                        };
                        assert_eq!(bits(&a), bits(&b));
                    }
                    (Err(_), Err(_)) => {}
                    (a, b) => panic!("uncompressed: {a:?}; gzipped: {b:?}"),
                }
            }
        }
    }
}

/// `model_file`: the bytes as `model.safetensors` (`--init-from`, `evaluate`).
pub fn model_file(data: &[u8]) {
    let path = Path::new("model.safetensors");
    match load_model_from_bytes(path, data.to_vec()) {
        Ok(model) => {
            let n = ParamLayout::new(&model.config).len();
            assert_eq!(model.params.len(), n);
            // Every parameter came from the file's bytes.
            assert!(4 * n <= data.len());
        }
        Err(e) => {
            let message = e.to_string();
            assert!(message.contains("model.safetensors"), "{message}");
        }
    }
}

/// `checkpoint_file`: the bytes as `checkpoint.safetensors` (`--resume`).
pub fn checkpoint_file(data: &[u8]) {
    let path = Path::new("checkpoint.safetensors");
    match Checkpoint::from_bytes(path, data.to_vec()) {
        Ok(checkpoint) => {
            let n = checkpoint.params.len();
            checkpoint
                .optimizer_state
                .check(&checkpoint.optimizer, n)
                .expect("a loaded checkpoint's optimizer state fits its parameters");
            checkpoint
                .optimizer
                .validate()
                .expect("a loaded optimizer is valid");
            assert!(4 * n <= data.len());
        }
        Err(e) => {
            let message = e.to_string();
            assert!(message.contains("checkpoint.safetensors"), "{message}");
        }
    }
}

//! IDX files, the format MNIST is distributed in: a big-endian header (magic, then one u32 per
//! dimension) followed by the values. Raw or gzip (detected from the content).
//!
//! Images: magic 2051 (`0x00000803`: unsigned bytes, 3 dimensions), `[n, rows, cols]`.
//! Labels: magic 2049 (`0x00000801`: unsigned bytes, 1 dimension), `[n]`.
//!
//! Nothing is allocated from the header's sizes: the byte count they imply is checked (without
//! overflow) against the bytes present first, and a gzipped file is decompressed no further than
//! its header declares (see `file.rs`).

use std::path::Path;

use super::Dataset;
use super::file::{Declared, decode_maybe_gzip};
use crate::{Error, Result};

/// Magic number of an IDX file of unsigned-byte images `[n, rows, cols]`.
pub const IDX_IMAGES_MAGIC: u32 = 0x0803;
/// Magic number of an IDX file of unsigned-byte labels `[n]`.
pub const IDX_LABELS_MAGIC: u32 = 0x0801;

/// Loads IDX images (pixels divided by 255, so in [0, 1]) and, if given, their labels.
pub fn load_idx(images: &Path, labels: Option<&Path>) -> Result<Dataset> {
    let image_bytes = std::fs::read(images).map_err(|e| Error::io(images, e))?;
    let labels = match labels {
        Some(path) => Some((path, std::fs::read(path).map_err(|e| Error::io(path, e))?)),
        None => None,
    };
    idx_from_bytes(images, image_bytes, labels)
}

/// [`load_idx`] on files' contents already in memory (raw or gzipped, as on disk); the paths
/// name them in errors.
pub fn idx_from_bytes(
    images: &Path,
    image_bytes: Vec<u8>,
    labels: Option<(&Path, Vec<u8>)>,
) -> Result<Dataset> {
    let image_bytes = decode_maybe_gzip(images, image_bytes, declared_images_len)?;
    let (pixels, n, shape) = parse_images(images, &image_bytes)?;
    drop(image_bytes);
    let labels = match labels {
        Some((path, bytes)) => {
            let labels = parse_labels(path, &decode_maybe_gzip(path, bytes, declared_labels_len)?)?;
            if labels.len() != n {
                return Err(Error::malformed(
                    path,
                    format!(
                        "{} labels, but the image file {} has {n} images: are they from the \
                         same split?",
                        labels.len(),
                        images.display()
                    ),
                ));
            }
            Some(labels)
        }
        None => None,
    };
    Dataset::from_parts(pixels, shape.0 * shape.1, shape, labels)
}

/// The length of an image file, from its first bytes (for capping decompression).
fn declared_images_len(prefix: &[u8]) -> Declared {
    declared_len(prefix, IDX_IMAGES_MAGIC)
}

/// The length of a label file, from its first bytes.
fn declared_labels_len(prefix: &[u8]) -> Declared {
    declared_len(prefix, IDX_LABELS_MAGIC)
}

/// Header plus one byte per element; [`Declared::Invalid`] where [`parse_header`] and
/// [`check_length`] refuse the header itself (wrong magic, impossibly large).
fn declared_len(prefix: &[u8], magic: u32) -> Declared {
    let ndims = (magic & 0xff) as usize;
    let header_len = 4 + 4 * ndims;
    let word =
        |i: usize| u32::from_be_bytes([prefix[i], prefix[i + 1], prefix[i + 2], prefix[i + 3]]);
    if prefix.len() >= 4 && word(0) != magic {
        return Declared::Invalid;
    }
    if prefix.len() < header_len {
        return Declared::Incomplete;
    }
    (0..ndims)
        .try_fold(1usize, |acc, d| acc.checked_mul(word(4 + 4 * d) as usize))
        .and_then(|n| n.checked_add(header_len))
        .map_or(Declared::Invalid, |len| Declared::Length(len as u64))
}

/// Parses an image file's bytes into pixels in [0, 1], the count, and `(rows, cols)`.
pub(crate) fn parse_images(path: &Path, bytes: &[u8]) -> Result<(Vec<f32>, usize, (usize, usize))> {
    let (dims, data) = parse_header(path, bytes, IDX_IMAGES_MAGIC)?;
    let (n, rows, cols) = (dims[0], dims[1], dims[2]);
    if n == 0 || rows == 0 || cols == 0 {
        return Err(Error::malformed(
            path,
            format!("holds {n} images of {rows} x {cols} pixels: nothing to train on"),
        ));
    }
    check_length(path, data, &dims, "images")?;
    let pixels = data.iter().map(|&v| f32::from(v) / 255.0).collect();
    Ok((pixels, n, (rows, cols)))
}

/// Parses a label file's bytes.
pub(crate) fn parse_labels(path: &Path, bytes: &[u8]) -> Result<Vec<u8>> {
    let (dims, data) = parse_header(path, bytes, IDX_LABELS_MAGIC)?;
    check_length(path, data, &dims, "labels")?;
    Ok(data.to_vec())
}

/// Checks the magic number and reads the dimensions; returns them and the data after the header.
fn parse_header<'a>(path: &Path, bytes: &'a [u8], magic: u32) -> Result<(Vec<usize>, &'a [u8])> {
    let ndims = (magic & 0xff) as usize;
    let header_len = 4 + 4 * ndims;
    let word = |i: usize| {
        bytes
            .get(i..i + 4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    };
    let found = word(0);
    if let Some(found) = found
        && found != magic
    {
        return Err(Error::malformed(
            path,
            format!(
                "magic number {found} (0x{found:08x}) is not {magic} (0x{magic:08x}), the magic of \
                 an IDX {}{}",
                kind(magic),
                match found {
                    IDX_IMAGES_MAGIC | IDX_LABELS_MAGIC => {
                        format!(": this is an IDX {}", kind(found))
                    }
                    _ => String::new(),
                }
            ),
        ));
    }
    if bytes.len() < header_len {
        return Err(Error::malformed(
            path,
            format!(
                "only {} bytes: too short for an IDX {} header ({header_len} bytes)",
                bytes.len(),
                kind(magic)
            ),
        ));
    }
    let dims = (0..ndims)
        .map(|d| word(4 + 4 * d).expect("header length checked above") as usize)
        .collect();
    Ok((dims, &bytes[header_len..]))
}

/// Checks that `data` holds exactly one byte per element of `dims`.
fn check_length(path: &Path, data: &[u8], dims: &[usize], what: &str) -> Result<()> {
    let shape = dims
        .iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(" x ");
    let expected = dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
    match expected {
        Some(expected) if expected == data.len() => Ok(()),
        Some(expected) if expected > data.len() => Err(Error::malformed(
            path,
            format!(
                "truncated: the header promises {shape} {what} ({expected} bytes of data) but \
                 only {} bytes follow it",
                data.len()
            ),
        )),
        Some(expected) => Err(Error::malformed(
            path,
            format!(
                "{} bytes follow the header but {shape} {what} need exactly {expected}: trailing \
                 data, or a wrong header",
                data.len()
            ),
        )),
        None => Err(Error::malformed(
            path,
            format!("the header's size {shape} is impossibly large"),
        )),
    }
}

fn kind(magic: u32) -> &'static str {
    match magic {
        IDX_IMAGES_MAGIC => "image file (unsigned bytes, [n, rows, cols])",
        _ => "label file (unsigned bytes, [n])",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idx(magic: u32, dims: &[u32], data: &[u8]) -> Vec<u8> {
        let mut out = magic.to_be_bytes().to_vec();
        for d in dims {
            out.extend_from_slice(&d.to_be_bytes());
        }
        out.extend_from_slice(data);
        out
    }

    #[test]
    fn parses_images_and_scales_to_unit_range() {
        let bytes = idx(IDX_IMAGES_MAGIC, &[2, 1, 2], &[0, 255, 51, 102]);
        let (pixels, n, shape) = parse_images(Path::new("i"), &bytes).unwrap();
        assert_eq!((n, shape), (2, (1, 2)));
        assert_eq!(pixels, vec![0.0, 1.0, 0.2, 0.4]);
    }

    #[test]
    fn label_file_given_as_images_says_so() {
        let bytes = idx(IDX_LABELS_MAGIC, &[3], &[1, 2, 3]);
        let msg = parse_images(Path::new("lab"), &bytes)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("magic number 2049") && msg.contains("label file"),
            "{msg}"
        );
    }

    #[test]
    fn short_header_and_trailing_bytes_are_errors() {
        let msg = parse_labels(Path::new("l"), &[0, 0, 8, 1, 0])
            .unwrap_err()
            .to_string();
        assert!(msg.contains("too short"), "{msg}");
        let msg = parse_labels(Path::new("l"), &idx(IDX_LABELS_MAGIC, &[2], &[1, 2, 3]))
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("3 bytes follow") && msg.contains("exactly 2"),
            "{msg}"
        );
    }

    #[test]
    fn huge_header_does_not_overflow() {
        let bytes = idx(IDX_IMAGES_MAGIC, &[u32::MAX, u32::MAX, u32::MAX], &[]);
        assert!(parse_images(Path::new("i"), &bytes).is_err());
    }
}

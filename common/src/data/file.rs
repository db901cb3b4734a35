//! Reading a data file whole, gunzipping it when its content (not its name) says it is gzip, with
//! the decompressed size capped.
//!
//! A gzip stream can expand about 1,000-fold (a megabyte of gzip can hold a gigabyte of zeros), so
//! the decompressed output is never trusted to be small. Decompression streams in 64 KiB pieces,
//! and stops with an error naming the file and the limit as soon as the output passes it:
//!
//! - the length the format's own header declares (IDX: header plus one byte per element; `.npy`:
//!   header plus shape times element size), learnt from the first decompressed bytes, so a file
//!   whose data runs past its header's promise fails after at most one piece more than it
//!   promised, and a header that promises more than the cap fails before anything else is
//!   decompressed;
//! - and an absolute cap on any decompressed file, [`DEFAULT_GZIP_MAX_BYTES`] (4 GiB) unless
//!   the environment variable [`GZIP_MAX_ENV`] gives another number of bytes.
//!
//! The output buffer grows with the bytes actually decompressed; nothing is reserved from a size
//! a header declares.

use std::path::Path;

use crate::{Error, Result};

/// The first two bytes of every gzip stream (RFC 1952).
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// The largest decompressed size of a gzipped data file, unless [`GZIP_MAX_ENV`] says otherwise:
/// 4 GiB (MNIST's largest file is 47 MB decompressed).
pub const DEFAULT_GZIP_MAX_BYTES: u64 = 4 << 30;

/// Environment variable overriding [`DEFAULT_GZIP_MAX_BYTES`] (a number of bytes).
pub const GZIP_MAX_ENV: &str = "VAE_GZIP_MAX_BYTES";

/// Decompressed bytes are read in pieces of this size.
#[cfg_attr(not(feature = "gzip"), allow(dead_code))]
const PIECE: usize = 64 << 10;

/// What a format's first bytes say about the whole (decompressed) file's length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Declared {
    /// Too few bytes to tell yet. A format returns this only for a bounded prefix (its largest
    /// header), never for ever.
    Incomplete,
    /// The content has no header declaring its length: only the cap applies.
    Unknown,
    /// The file should be exactly this many bytes long (saturated at `u64::MAX` if the header's
    /// product overflows).
    Length(u64),
    /// The header is wrong in a way its parser reports from these bytes alone: stop decompressing
    /// and let the parser say what is wrong.
    Invalid,
}

/// A format's header reader: how long the file should be, from its first bytes.
pub(crate) type HeaderFn = fn(&[u8]) -> Declared;

/// `raw` itself, or its decompression (within the caps above) if it starts with the gzip magic.
/// `path` names the file in errors.
pub(crate) fn decode_maybe_gzip(path: &Path, raw: Vec<u8>, header: HeaderFn) -> Result<Vec<u8>> {
    if !raw.starts_with(&GZIP_MAGIC) {
        return Ok(raw);
    }
    gunzip(path, &raw, gzip_max_bytes()?, header)
}

/// The absolute cap: [`GZIP_MAX_ENV`] if set, else [`DEFAULT_GZIP_MAX_BYTES`].
pub fn gzip_max_bytes() -> Result<u64> {
    match std::env::var(GZIP_MAX_ENV) {
        Err(std::env::VarError::NotPresent) => Ok(DEFAULT_GZIP_MAX_BYTES),
        Ok(text) => text.trim().parse::<u64>().map_err(|_| {
            Error::Config(format!(
                "{GZIP_MAX_ENV}=`{text}` is not a number of bytes: set it to the largest \
                 decompressed size a gzipped data file may have, e.g. 8589934592 for 8 GiB, or \
                 unset it for the default {DEFAULT_GZIP_MAX_BYTES}"
            ))
        }),
        Err(std::env::VarError::NotUnicode(_)) => Err(Error::Config(format!(
            "{GZIP_MAX_ENV} is not text: set it to a number of bytes or unset it"
        ))),
    }
}

/// The decompression of the gzip stream `raw` (concatenated members are joined), refused once it
/// passes `max_bytes`; the format is unknown, so only that cap applies. The fuzzed entry point
/// of the gzip path; data files go through the same code with their header's length as a
/// second limit.
pub fn gunzip_capped(path: &Path, raw: &[u8], max_bytes: u64) -> Result<Vec<u8>> {
    gunzip(path, raw, max_bytes, |_| Declared::Unknown)
}

/// The decompression of `raw`, within `max_bytes` and the length `header` declares.
#[cfg(feature = "gzip")]
fn gunzip(path: &Path, raw: &[u8], max_bytes: u64, header: HeaderFn) -> Result<Vec<u8>> {
    use std::io::Read;
    let mut decoder = flate2::read::MultiGzDecoder::new(raw);
    let mut out = Vec::new();
    let mut piece = vec![0u8; PIECE];
    // The length the header declares, once read (the limit until then is the cap).
    let mut declared: Option<u64> = None;
    let mut header_read = false;
    loop {
        // Never more than one byte past the limit, so passing it is noticed with nothing extra
        // decompressed.
        let limit = declared.unwrap_or(max_bytes);
        let room = limit.saturating_sub(out.len() as u64);
        let want = usize::try_from(room.saturating_add(1)).map_or(PIECE, |w| w.min(PIECE));
        let n = match decoder.read(&mut piece[..want]) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(corrupt(path, &e)),
        };
        out.extend_from_slice(&piece[..n]);
        if !header_read {
            header_read = true;
            match header(&out) {
                Declared::Incomplete => header_read = false,
                Declared::Unknown => {}
                // The parser reports the bad header from the bytes so far.
                Declared::Invalid => return Ok(out),
                Declared::Length(len) if len > max_bytes => {
                    return Err(Error::malformed(
                        path,
                        format!(
                            "its header declares {} of data once decompressed, more than the \
                             {} cap on a gzipped data file: if the file is genuine, raise the \
                             cap with {GZIP_MAX_ENV}=BYTES or decompress it first (`gunzip -k`)",
                            show_bytes(len),
                            show_bytes(max_bytes)
                        ),
                    ));
                }
                Declared::Length(len) => declared = Some(len),
            }
        }
        let limit = declared.unwrap_or(max_bytes);
        if out.len() as u64 > limit {
            return Err(too_large(path, declared, max_bytes, out.len() as u64));
        }
    }
    Ok(out)
}

/// Built without the `gzip` feature: the file is refused, saying what to do.
#[cfg(not(feature = "gzip"))]
fn gunzip(path: &Path, _raw: &[u8], _max_bytes: u64, _header: HeaderFn) -> Result<Vec<u8>> {
    Err(Error::malformed(
        path,
        "the file is gzipped, and this build reads no gzip (common's `gzip` feature is off): \
         decompress it first (`gunzip -k`)",
    ))
}

#[cfg(feature = "gzip")]
fn corrupt(path: &Path, e: &std::io::Error) -> Error {
    let problem = if e.kind() == std::io::ErrorKind::UnexpectedEof {
        "the gzip stream ends early: the file is truncated (an interrupted download?)".to_string()
    } else {
        format!("the gzip stream is corrupt: {e}")
    };
    Error::malformed(path, problem)
}

/// The output passed its limit after `reached` bytes.
#[cfg(feature = "gzip")]
fn too_large(path: &Path, declared: Option<u64>, max_bytes: u64, reached: u64) -> Error {
    let problem = match declared {
        Some(len) if len < max_bytes => format!(
            "decompresses to more than the {} its header declares (stopped after {}): the file \
             has trailing data or is a gzip bomb; check where it came from",
            show_bytes(len),
            show_bytes(reached)
        ),
        _ => format!(
            "decompresses to more than the {} cap on a gzipped data file (stopped after {}): \
             it is a gzip bomb or a larger file than expected; if it is genuine, raise the cap \
             with {GZIP_MAX_ENV}=BYTES or decompress it first (`gunzip -k`)",
            show_bytes(max_bytes),
            show_bytes(reached)
        ),
    };
    Error::malformed(path, problem)
}

/// `123456789 bytes (117.7 MiB)`.
#[cfg(feature = "gzip")]
fn show_bytes(n: u64) -> String {
    if n < 1 << 20 {
        format!("{n} bytes")
    } else {
        format!("{n} bytes ({:.1} MiB)", n as f64 / f64::from(1 << 20))
    }
}

#[cfg(all(test, feature = "gzip"))]
mod tests {
    use std::io::Write;

    use flate2::{Compression, write::GzEncoder};

    use super::*;

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut enc = GzEncoder::new(Vec::new(), Compression::default());
        enc.write_all(bytes).unwrap();
        enc.finish().unwrap()
    }

    fn any_length(_: &[u8]) -> Declared {
        Declared::Unknown
    }

    /// A format whose first byte is its length.
    fn first_byte_is_length(prefix: &[u8]) -> Declared {
        match prefix.first() {
            None => Declared::Incomplete,
            Some(0) => Declared::Invalid,
            Some(&n) => Declared::Length(u64::from(n)),
        }
    }

    #[test]
    fn detects_gzip_by_content() {
        let p = Path::new("x.bin");
        assert_eq!(
            decode_maybe_gzip(p, b"plain".to_vec(), any_length).unwrap(),
            b"plain"
        );
        assert_eq!(
            decode_maybe_gzip(p, gzip(b"packed"), any_length).unwrap(),
            b"packed"
        );
    }

    #[test]
    fn truncated_gzip_is_reported_as_truncated() {
        let mut z = gzip(&[7u8; 1000]);
        z.truncate(z.len() / 2);
        let msg = decode_maybe_gzip(Path::new("x.gz"), z, any_length)
            .unwrap_err()
            .to_string();
        assert!(
            msg.starts_with("x.gz: ") && msg.contains("truncated"),
            "{msg}"
        );
    }

    #[test]
    fn output_past_the_cap_is_refused_naming_file_and_cap() {
        let z = gzip(&vec![0u8; 300_000]);
        assert_eq!(
            gunzip_capped(Path::new("z.gz"), &z, 300_000).unwrap().len(),
            300_000
        );
        let msg = gunzip_capped(Path::new("z.gz"), &z, 299_999)
            .unwrap_err()
            .to_string();
        assert!(
            msg.starts_with("z.gz: ") && msg.contains("more than the 299999 bytes cap"),
            "{msg}"
        );
        assert!(msg.contains(GZIP_MAX_ENV), "{msg}");
    }

    #[test]
    fn output_past_the_declared_length_is_refused() {
        let p = Path::new("d.gz");
        let mut content = vec![5u8; 5];
        assert_eq!(
            gunzip(p, &gzip(&content), 100, first_byte_is_length).unwrap(),
            content
        );
        content.push(0);
        let msg = gunzip(p, &gzip(&content), 100, first_byte_is_length)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("more than the 5 bytes its header declares"),
            "{msg}"
        );
        // A header declaring more than the cap is refused before the data is read.
        let msg = gunzip(p, &gzip(&[200, 1, 2]), 100, first_byte_is_length)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("declares 200 bytes") && msg.contains("100 bytes cap"),
            "{msg}"
        );
        // An invalid header stops decompression; the parser gets the prefix.
        let long = [vec![0u8], vec![1u8; 1 << 20]].concat();
        let prefix = gunzip(p, &gzip(&long), 100, first_byte_is_length).unwrap();
        assert!(
            !prefix.is_empty() && prefix.len() <= PIECE,
            "{}",
            prefix.len()
        );
    }
}

#[cfg(all(test, not(feature = "gzip")))]
mod tests_without_gzip {
    use super::*;

    #[test]
    fn gzipped_content_is_refused_saying_why() {
        let any = |_: &[u8]| Declared::Unknown;
        let msg = decode_maybe_gzip(Path::new("x.gz"), vec![0x1f, 0x8b, 8, 0], any)
            .unwrap_err()
            .to_string();
        assert!(
            msg.starts_with("x.gz: ") && msg.contains("`gzip` feature"),
            "{msg}"
        );
        assert_eq!(
            decode_maybe_gzip(Path::new("x"), b"raw".to_vec(), any).unwrap(),
            b"raw"
        );
    }
}

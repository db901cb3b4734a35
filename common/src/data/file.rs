//! Reading a data file whole, gunzipping it when its content (not its name) says it is gzip.

use std::path::Path;

use crate::{Error, Result};

/// The first two bytes of every gzip stream (RFC 1952).
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// The bytes of `path`, decompressed if the file starts with the gzip magic.
pub(crate) fn read_maybe_gzip(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    gunzip_if_gzip(path, raw)
}

/// `raw` itself, or its decompression if it starts with the gzip magic. `path` names the file in
/// errors.
pub(crate) fn gunzip_if_gzip(path: &Path, raw: Vec<u8>) -> Result<Vec<u8>> {
    if !raw.starts_with(&GZIP_MAGIC) {
        return Ok(raw);
    }
    gunzip(path, &raw)
}

/// The decompression of the gzip stream `raw` (a whole file; concatenated members are joined).
#[cfg(feature = "gzip")]
fn gunzip(path: &Path, raw: &[u8]) -> Result<Vec<u8>> {
    use std::io::Read;
    let mut out = Vec::with_capacity(raw.len() * 4);
    flate2::read::MultiGzDecoder::new(raw)
        .read_to_end(&mut out)
        .map_err(|e| {
            let problem = if e.kind() == std::io::ErrorKind::UnexpectedEof {
                "the gzip stream ends early: the file is truncated (an interrupted download?)"
                    .to_string()
            } else {
                format!("the gzip stream is corrupt: {e}")
            };
            Error::malformed(path, problem)
        })?;
    Ok(out)
}

/// Built without the `gzip` feature: the file is refused, saying what to do.
#[cfg(not(feature = "gzip"))]
fn gunzip(path: &Path, _raw: &[u8]) -> Result<Vec<u8>> {
    Err(Error::malformed(
        path,
        "the file is gzipped, and this build reads no gzip (common's `gzip` feature is off): \
         decompress it first (`gunzip -k`)",
    ))
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

    #[test]
    fn detects_gzip_by_content() {
        let p = Path::new("x.bin");
        assert_eq!(gunzip_if_gzip(p, b"plain".to_vec()).unwrap(), b"plain");
        assert_eq!(gunzip_if_gzip(p, gzip(b"packed")).unwrap(), b"packed");
    }

    #[test]
    fn truncated_gzip_is_reported_as_truncated() {
        let mut z = gzip(&[7u8; 1000]);
        z.truncate(z.len() / 2);
        let msg = gunzip_if_gzip(Path::new("x.gz"), z)
            .unwrap_err()
            .to_string();
        assert!(
            msg.starts_with("x.gz: ") && msg.contains("truncated"),
            "{msg}"
        );
    }
}

#[cfg(all(test, not(feature = "gzip")))]
mod tests_without_gzip {
    use super::*;

    #[test]
    fn gzipped_content_is_refused_saying_why() {
        let msg = gunzip_if_gzip(Path::new("x.gz"), vec![0x1f, 0x8b, 8, 0])
            .unwrap_err()
            .to_string();
        assert!(
            msg.starts_with("x.gz: ") && msg.contains("`gzip` feature"),
            "{msg}"
        );
        assert_eq!(
            gunzip_if_gzip(Path::new("x"), b"raw".to_vec()).unwrap(),
            b"raw"
        );
    }
}

//! Reading a data file whole, gunzipping it when its content (not its name) says it is gzip.

use std::io::Read;
use std::path::Path;

use flate2::read::MultiGzDecoder;

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
    let mut out = Vec::with_capacity(raw.len() * 4);
    MultiGzDecoder::new(raw.as_slice())
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

#[cfg(test)]
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

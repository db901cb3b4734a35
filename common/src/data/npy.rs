//! NumPy `.npy` arrays (format versions 1.0, 2.0 and 3.0), as written by `numpy.save`.
//!
//! Images: `uint8` (`|u1`, divided by 255) or little-endian `float32` (`<f4`, kept as is) or
//! `float64` (`<f8`, rounded to f32), shape `[N, D]` or `[N, H, W]`, C order. Labels: `uint8`,
//! `int32` or `int64`, shape `[N]`, values 0..=255. Anything else is an error that names the file
//! and what it found, never a guess.

use std::path::Path;

use super::Dataset;
use super::file::{Declared, decode_maybe_gzip};
use crate::{Error, Result};

/// The first six bytes of every `.npy` file.
const NPY_MAGIC: &[u8] = b"\x93NUMPY";

/// The longest header read. numpy writes about 128 bytes and by default refuses to read more
/// than 10,000 (`max_header_size`); this bounds how much is decompressed before the data's length
/// is known.
const MAX_HEADER_LEN: usize = 64 << 10;

/// Loads images from a `.npy` file and, if given, labels from another.
pub fn load_npy(images: &Path, labels: Option<&Path>) -> Result<Dataset> {
    let image_bytes = std::fs::read(images).map_err(|e| Error::io(images, e))?;
    let labels = match labels {
        Some(path) => Some((path, std::fs::read(path).map_err(|e| Error::io(path, e))?)),
        None => None,
    };
    npy_from_bytes(images, image_bytes, labels)
}

/// [`load_npy`] on files' contents already in memory (raw or gzipped, as on disk); the paths
/// name them in errors.
pub fn npy_from_bytes(
    images: &Path,
    image_bytes: Vec<u8>,
    labels: Option<(&Path, Vec<u8>)>,
) -> Result<Dataset> {
    let bytes = decode_maybe_gzip(images, image_bytes, declared_len)?;
    let array = NpyArray::parse(images, &bytes)?;
    let (n, (height, width)) = image_shape(images, &array.shape)?;
    let pixels = array.to_f32_pixels(images)?;
    drop(bytes);
    let labels = match labels {
        Some((path, bytes)) => {
            let bytes = decode_maybe_gzip(path, bytes, declared_len)?;
            let labels = NpyArray::parse(path, &bytes)?.to_labels(path)?;
            if labels.len() != n {
                return Err(Error::malformed(
                    path,
                    format!(
                        "{} labels, but the image file {} has {n} images",
                        labels.len(),
                        images.display()
                    ),
                ));
            }
            Some(labels)
        }
        None => None,
    };
    Dataset::from_parts(pixels, height * width, (height, width), labels)
}

/// `[N, D]` (a square `D` is taken as `sqrt(D) x sqrt(D)` images, any other as `1 x D`) or
/// `[N, H, W]`: returns `N` and `(H, W)`.
fn image_shape(path: &Path, shape: &[usize]) -> Result<(usize, (usize, usize))> {
    let (n, hw) = match *shape {
        [n, d] => {
            let side = d.isqrt();
            (
                n,
                if side * side == d {
                    (side, side)
                } else {
                    (1, d)
                },
            )
        }
        [n, h, w] => (n, (h, w)),
        _ => {
            return Err(Error::malformed(
                path,
                format!(
                    "array shape {} is not images: expected [N, D] or [N, H, W]",
                    show_shape(shape)
                ),
            ));
        }
    };
    if n == 0 || hw.0 == 0 || hw.1 == 0 {
        return Err(Error::malformed(
            path,
            format!("array shape {} holds no pixels", show_shape(shape)),
        ));
    }
    Ok((n, hw))
}

/// The element types we read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dtype {
    U8,
    I32,
    I64,
    F32,
    F64,
}

impl Dtype {
    /// From a NumPy type string such as `<f4`. Big-endian and unknown types are errors.
    fn parse(path: &Path, descr: &str) -> Result<Self> {
        let dtype = match descr {
            "|u1" | "<u1" | ">u1" => Dtype::U8,
            "<i4" => Dtype::I32,
            "<i8" => Dtype::I64,
            "<f4" => Dtype::F32,
            "<f8" => Dtype::F64,
            ">i4" | ">i8" | ">f4" | ">f8" => {
                return Err(Error::malformed(
                    path,
                    format!(
                        "dtype `{descr}` is big-endian, which is not supported: save it \
                         little-endian, e.g. `numpy.save(path, a.astype('<{}'))`",
                        &descr[1..]
                    ),
                ));
            }
            _ => {
                return Err(Error::malformed(
                    path,
                    format!(
                        "dtype `{descr}` is not supported: images must be uint8 (`|u1`), float32 \
                         (`<f4`) or float64 (`<f8`); labels uint8, int32 or int64"
                    ),
                ));
            }
        };
        Ok(dtype)
    }

    fn size(self) -> usize {
        match self {
            Dtype::U8 => 1,
            Dtype::I32 | Dtype::F32 => 4,
            Dtype::I64 | Dtype::F64 => 8,
        }
    }
}

/// A parsed `.npy` file: its element type, shape and raw (little-endian) data.
#[derive(Debug)]
struct NpyArray<'a> {
    dtype: Dtype,
    descr: String,
    shape: Vec<usize>,
    data: &'a [u8],
}

/// A `.npy` header, checked: where the data starts and how many bytes it must have.
#[derive(Debug)]
struct NpyHeader {
    dtype: Dtype,
    descr: String,
    shape: Vec<usize>,
    data_start: usize,
    /// Shape times element size, checked for overflow.
    data_len: usize,
}

/// Why a header does not parse.
#[derive(Debug)]
enum HeaderProblem {
    /// The bytes end inside the header: more bytes might make it valid.
    Truncated(String),
    /// The header itself is wrong, whatever follows.
    Bad(String),
}

impl NpyHeader {
    /// Reads and checks the header at the start of `bytes` (the whole file or a prefix of it).
    fn parse(path: &Path, bytes: &[u8]) -> Result<Self, HeaderProblem> {
        use HeaderProblem::{Bad, Truncated};
        if !bytes.starts_with(NPY_MAGIC) {
            return Err(if NPY_MAGIC.starts_with(bytes) && !bytes.is_empty() {
                Truncated("truncated .npy header".into())
            } else {
                Bad("not a .npy file: it does not start with the \\x93NUMPY magic".into())
            });
        }
        let (major, minor) = match bytes.get(6..8) {
            Some(v) => (v[0], v[1]),
            None => return Err(Truncated("truncated .npy header".into())),
        };
        let (len_bytes, header_start) = match major {
            1 => (2, 10),
            2 | 3 => (4, 12),
            _ => {
                return Err(Bad(format!(
                    ".npy format version {major}.{minor} is not supported (1.0, 2.0 and 3.0 are)"
                )));
            }
        };
        let header_len = match bytes.get(8..8 + len_bytes) {
            Some([a, b]) => u16::from_le_bytes([*a, *b]) as usize,
            Some([a, b, c, d]) => u32::from_le_bytes([*a, *b, *c, *d]) as usize,
            _ => return Err(Truncated("truncated .npy header".into())),
        };
        if header_len > MAX_HEADER_LEN {
            return Err(Bad(format!(
                "the .npy header claims to be {header_len} bytes long, more than the \
                 {MAX_HEADER_LEN} this program reads (numpy writes about 128): the file is \
                 corrupt or not a NumPy array"
            )));
        }
        let header = bytes
            .get(header_start..header_start + header_len)
            .ok_or_else(|| {
                Truncated(format!(
                    "truncated .npy header: {header_len} header bytes announced, {} present",
                    bytes.len().saturating_sub(header_start)
                ))
            })?;
        let header =
            std::str::from_utf8(header).map_err(|_| Bad(".npy header is not text".into()))?;
        let fields = HeaderDict::parse(header).map_err(|problem| {
            Bad(format!(
                "bad .npy header `{}`: {problem}",
                header.trim_end()
            ))
        })?;
        if fields.fortran_order {
            return Err(Bad(
                "the array is in Fortran order (fortran_order: True), which is not supported: \
                 save it in C order, e.g. `numpy.save(path, numpy.ascontiguousarray(a))`"
                    .into(),
            ));
        }
        let dtype = Dtype::parse(path, &fields.descr).map_err(|e| match e {
            Error::Malformed { problem, .. } => Bad(problem),
            other => Bad(other.to_string()),
        })?;
        let data_len = fields
            .shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .and_then(|c| c.checked_mul(dtype.size()))
            .filter(|len| len.checked_add(header_start + header_len).is_some())
            .ok_or_else(|| {
                Bad(format!(
                    "shape {} is impossibly large",
                    show_shape(&fields.shape)
                ))
            })?;
        Ok(NpyHeader {
            dtype,
            descr: fields.descr,
            shape: fields.shape,
            data_start: header_start + header_len,
            data_len,
        })
    }
}

/// The length of a `.npy` file from its first bytes (for capping decompression).
fn declared_len(prefix: &[u8]) -> Declared {
    match NpyHeader::parse(Path::new(""), prefix) {
        Ok(h) => Declared::Length((h.data_start + h.data_len) as u64),
        Err(HeaderProblem::Truncated(_)) => Declared::Incomplete,
        Err(HeaderProblem::Bad(_)) => Declared::Invalid,
    }
}

impl<'a> NpyArray<'a> {
    fn parse(path: &Path, bytes: &'a [u8]) -> Result<Self> {
        let header = NpyHeader::parse(path, bytes).map_err(|problem| match problem {
            HeaderProblem::Truncated(p) | HeaderProblem::Bad(p) => Error::malformed(path, p),
        })?;
        let data = &bytes[header.data_start..];
        let expected = header.data_len;
        let shape = show_shape(&header.shape);
        if expected > data.len() {
            return Err(Error::malformed(
                path,
                format!(
                    "truncated: shape {shape} of `{}` needs {expected} bytes of data but only {} \
                     follow the header",
                    header.descr,
                    data.len()
                ),
            ));
        }
        if expected < data.len() {
            return Err(Error::malformed(
                path,
                format!(
                    "{} bytes follow the header but shape {shape} of `{}` needs exactly \
                     {expected}: trailing data, or a wrong header",
                    data.len(),
                    header.descr
                ),
            ));
        }
        Ok(NpyArray {
            dtype: header.dtype,
            descr: header.descr,
            shape: header.shape,
            data,
        })
    }

    /// Image pixels: uint8 scaled by 1/255, floats as f32.
    fn to_f32_pixels(&self, path: &Path) -> Result<Vec<f32>> {
        let pixels = match self.dtype {
            Dtype::U8 => self.data.iter().map(|&v| f32::from(v) / 255.0).collect(),
            Dtype::F32 => self
                .data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::F64 => self
                .data
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes(b.try_into().expect("8-byte chunk")) as f32)
                .collect(),
            Dtype::I32 | Dtype::I64 => {
                return Err(Error::malformed(
                    path,
                    format!(
                        "dtype `{}` (integers) is not supported for images: use uint8 (`|u1`, \
                         0..255) or float32 (`<f4`)",
                        self.descr
                    ),
                ));
            }
        };
        Ok(pixels)
    }

    /// Labels: a 1-D integer array with values in 0..=255.
    fn to_labels(&self, path: &Path) -> Result<Vec<u8>> {
        if self.shape.len() != 1 {
            return Err(Error::malformed(
                path,
                format!(
                    "labels must be a 1-D array [N], found shape {}",
                    show_shape(&self.shape)
                ),
            ));
        }
        let values: Vec<i64> = match self.dtype {
            Dtype::U8 => return Ok(self.data.to_vec()),
            Dtype::I32 => self
                .data
                .chunks_exact(4)
                .map(|b| i64::from(i32::from_le_bytes([b[0], b[1], b[2], b[3]])))
                .collect(),
            Dtype::I64 => self
                .data
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().expect("8-byte chunk")))
                .collect(),
            Dtype::F32 | Dtype::F64 => {
                return Err(Error::malformed(
                    path,
                    format!(
                        "dtype `{}` is not supported for labels: use uint8, int32 or int64",
                        self.descr
                    ),
                ));
            }
        };
        values
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                u8::try_from(v).map_err(|_| {
                    Error::malformed(path, format!("label {i} is {v}, outside 0..=255"))
                })
            })
            .collect()
    }
}

fn show_shape(shape: &[usize]) -> String {
    let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
    format!("[{}]", dims.join(", "))
}

/// The three fields of a `.npy` header, a Python dict literal such as
/// `{'descr': '<f4', 'fortran_order': False, 'shape': (70000, 784), }`.
#[derive(Debug, PartialEq)]
struct HeaderDict {
    descr: String,
    fortran_order: bool,
    shape: Vec<usize>,
}

/// A value in the header dict.
#[derive(Debug)]
enum PyValue {
    Str(String),
    Bool(bool),
    Tuple(Vec<usize>),
}

impl HeaderDict {
    /// Parses the dict literal; the error says what was expected where.
    fn parse(text: &str) -> Result<Self, String> {
        let mut p = Parser { rest: text };
        p.expect('{')?;
        let (mut descr, mut fortran_order, mut shape) = (None, None, None);
        loop {
            if p.eat('}') {
                break;
            }
            let key = p.string()?;
            p.expect(':')?;
            let value = p.value()?;
            match (key.as_str(), value) {
                ("descr", PyValue::Str(s)) => descr = Some(s),
                ("fortran_order", PyValue::Bool(b)) => fortran_order = Some(b),
                ("shape", PyValue::Tuple(t)) => shape = Some(t),
                ("descr" | "fortran_order" | "shape", v) => {
                    return Err(format!("`{key}` has an unexpected value {v:?}"));
                }
                _ => {} // numpy writes no other keys; ignore any a future version adds
            }
            if !p.eat(',') {
                p.expect('}')?;
                break;
            }
        }
        if !p.rest.trim().is_empty() {
            return Err(format!(
                "unexpected text after the dict: `{}`",
                p.rest.trim()
            ));
        }
        let missing = |k: &str| format!("no `{k}` key");
        Ok(HeaderDict {
            descr: descr.ok_or_else(|| missing("descr"))?,
            fortran_order: fortran_order.ok_or_else(|| missing("fortran_order"))?,
            shape: shape.ok_or_else(|| missing("shape"))?,
        })
    }
}

/// A cursor over the header text.
struct Parser<'a> {
    rest: &'a str,
}

impl Parser<'_> {
    fn skip_ws(&mut self) {
        self.rest = self.rest.trim_start();
    }

    fn eat(&mut self, c: char) -> bool {
        self.skip_ws();
        match self.rest.strip_prefix(c) {
            Some(rest) => {
                self.rest = rest;
                true
            }
            None => false,
        }
    }

    fn expect(&mut self, c: char) -> Result<(), String> {
        if self.eat(c) {
            Ok(())
        } else {
            Err(format!("expected `{c}` at `{}`", self.snippet()))
        }
    }

    fn snippet(&self) -> String {
        self.rest.chars().take(20).collect()
    }

    fn string(&mut self) -> Result<String, String> {
        self.skip_ws();
        let quote = match self.rest.chars().next() {
            Some(q @ ('\'' | '"')) => q,
            _ => return Err(format!("expected a quoted string at `{}`", self.snippet())),
        };
        let body = &self.rest[1..];
        let end = body
            .find(quote)
            .ok_or_else(|| "unterminated string".to_string())?;
        self.rest = &body[end + 1..];
        Ok(body[..end].to_string())
    }

    fn value(&mut self) -> Result<PyValue, String> {
        self.skip_ws();
        if self.rest.starts_with(['\'', '"']) {
            return self.string().map(PyValue::Str);
        }
        for (word, value) in [("True", true), ("False", false)] {
            if let Some(rest) = self.rest.strip_prefix(word) {
                self.rest = rest;
                return Ok(PyValue::Bool(value));
            }
        }
        if self.eat('(') {
            let mut dims = Vec::new();
            loop {
                if self.eat(')') {
                    break;
                }
                dims.push(self.integer()?);
                if !self.eat(',') {
                    self.expect(')')?;
                    break;
                }
            }
            return Ok(PyValue::Tuple(dims));
        }
        Err(format!(
            "expected a string, True, False or a tuple at `{}`",
            self.snippet()
        ))
    }

    fn integer(&mut self) -> Result<usize, String> {
        self.skip_ws();
        let digits = self.rest.len()
            - self
                .rest
                .trim_start_matches(|c: char| c.is_ascii_digit())
                .len();
        // Python 2 wrote long integers with an `L` suffix.
        let value = self.rest[..digits]
            .parse()
            .map_err(|_| format!("expected a dimension at `{}`", self.snippet()))?;
        self.rest = &self.rest[digits..];
        self.rest = self.rest.strip_prefix('L').unwrap_or(self.rest);
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_numpy_headers() {
        let h = HeaderDict::parse(
            "{'descr': '<f4', 'fortran_order': False, 'shape': (70000, 784), }   \n",
        )
        .unwrap();
        assert_eq!(
            h,
            HeaderDict {
                descr: "<f4".into(),
                fortran_order: false,
                shape: vec![70000, 784]
            }
        );
        let h = HeaderDict::parse("{\"shape\": (5,), \"fortran_order\": True, \"descr\": \"|u1\"}")
            .unwrap();
        assert_eq!((h.shape, h.fortran_order), (vec![5], true));
        assert_eq!(
            HeaderDict::parse("{'descr': '<f8', 'fortran_order': False, 'shape': ()}")
                .unwrap()
                .shape,
            Vec::<usize>::new()
        );
    }

    #[test]
    fn rejects_broken_headers() {
        for bad in [
            "",
            "{'descr': '<f4', 'fortran_order': False}",
            "{'descr': '<f4', 'fortran_order': 0, 'shape': (2,)}",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (2, x)}",
            "{'descr: '<f4'",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (2,)} junk",
        ] {
            assert!(HeaderDict::parse(bad).is_err(), "accepted `{bad}`");
        }
    }

    #[test]
    fn flat_square_rows_become_square_images() {
        let p = Path::new("a.npy");
        assert_eq!(image_shape(p, &[3, 784]).unwrap(), (3, (28, 28)));
        assert_eq!(image_shape(p, &[3, 10]).unwrap(), (3, (1, 10)));
        assert_eq!(image_shape(p, &[3, 4, 5]).unwrap(), (3, (4, 5)));
        assert!(image_shape(p, &[3]).is_err());
        assert!(image_shape(p, &[0, 784]).is_err());
    }
}

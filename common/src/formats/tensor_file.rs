//! safetensors files of f32 tensors: a deterministic writer and a checking reader, shared by
//! [`save_model`](super::save_model) and [`Checkpoint`](super::Checkpoint).
//!
//! The writer emits the format itself rather than calling `safetensors::serialize`, whose header
//! metadata is a `HashMap` serialised in random order: ours sorts header keys and keeps tensor data
//! in the order given, so the same tensors and metadata always give the same bytes (two runs that
//! end with the same parameters write byte-identical files).
//!
//! The reader is ours too, because model files come from users (`--init-from`, `evaluate`) and
//! must not be trusted: the `safetensors` crate's `read_metadata` (0.8.0) overflows an addition
//! on offsets near `usize::MAX` (a panic in debug builds), and puts no bound on the number of
//! tensors or metadata entries a header may list. Ours checks every size against the bytes
//! present with checked arithmetic, bounds the header's entries while parsing, and accepts
//! exactly the files the format allows (`common/tests/model_file.rs` reads files written by the
//! reference writer).
//!
//! Layout: an 8-byte little-endian header length N, N bytes of JSON header padded with spaces to
//! a multiple of 8, then the tensors' little-endian bytes back to back.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::de::{Deserializer, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// A named f32 tensor to write.
#[derive(Debug, Clone, Copy)]
pub(crate) struct F32Tensor<'a> {
    pub name: &'a str,
    pub shape: &'a [usize],
    pub data: &'a [f32],
}

#[derive(Serialize)]
#[serde(untagged)]
enum HeaderEntry<'a> {
    Metadata(&'a BTreeMap<String, String>),
    Tensor {
        dtype: &'static str,
        shape: &'a [usize],
        data_offsets: [usize; 2],
    },
}

const METADATA_KEY: &str = "__metadata__";

/// Serialises `tensors` (data in the order given) and `metadata` as a safetensors file.
///
/// Panics if a tensor's data length differs from its shape's product or a name repeats or is
/// `__metadata__`: callers build tensors from a layout, so that is a bug.
pub(crate) fn encode(tensors: &[F32Tensor<'_>], metadata: &BTreeMap<String, String>) -> Vec<u8> {
    let data: usize = tensors.iter().map(|t| 4 * t.data.len()).sum();
    let mut out = Vec::with_capacity(data + 4096);
    encode_to(&mut out, tensors, metadata).expect("writing to a Vec cannot fail");
    out
}

/// [`encode`] into `out` as it goes: the tensors' bytes pass through a small buffer, so a large
/// file is never whole in memory (a checkpoint of the default model is 10 MB, which would be a
/// fresh allocation, its pages faulted in, every time; docs/scaling.md §29).
pub(crate) fn encode_to(
    out: &mut impl Write,
    tensors: &[F32Tensor<'_>],
    metadata: &BTreeMap<String, String>,
) -> std::io::Result<()> {
    let mut header: BTreeMap<&str, HeaderEntry<'_>> = BTreeMap::new();
    if !metadata.is_empty() {
        header.insert(METADATA_KEY, HeaderEntry::Metadata(metadata));
    }
    let mut offset = 0;
    for t in tensors {
        assert_eq!(
            t.shape.iter().product::<usize>(),
            t.data.len(),
            "tensor `{}`: shape {:?} does not match its data",
            t.name,
            t.shape
        );
        let end = offset + 4 * t.data.len();
        let previous = header.insert(
            t.name,
            HeaderEntry::Tensor {
                dtype: "F32",
                shape: t.shape,
                data_offsets: [offset, end],
            },
        );
        assert!(previous.is_none(), "tensor name `{}` used twice", t.name);
        offset = end;
    }
    let mut header_bytes =
        serde_json::to_vec(&header).expect("a map of strings and numbers serialises");
    // Pad so the data starts 8-byte aligned, as the reference writer does.
    header_bytes.resize(header_bytes.len().next_multiple_of(8), b' ');

    out.write_all(&(header_bytes.len() as u64).to_le_bytes())?;
    out.write_all(&header_bytes)?;
    let largest = tensors.iter().map(|t| t.data.len()).max().unwrap_or(0);
    let mut bytes = vec![0u8; 4 * largest.min(STREAM_VALUES)];
    for t in tensors {
        for values in t.data.chunks(STREAM_VALUES) {
            let bytes = &mut bytes[..4 * values.len()];
            for (slot, v) in bytes.chunks_exact_mut(4).zip(values) {
                slot.copy_from_slice(&v.to_le_bytes());
            }
            out.write_all(bytes)?;
        }
    }
    Ok(())
}

/// Values per write when streaming tensors: 256 KiB, a few syscalls per megabyte.
const STREAM_VALUES: usize = 1 << 16;

/// The largest header read: the `safetensors` crate's limit.
const MAX_HEADER_BYTES: usize = 100_000_000;
/// The most tensors a file may list (a model has 4 per hidden layer plus 6, a checkpoint at most
/// 3): bounds the memory a header of many tiny entries can take.
pub(crate) const MAX_TENSORS: usize = 1 << 16;
/// The most `__metadata__` entries (this program writes under ten plus the caller's few).
const MAX_METADATA_ENTRIES: usize = 1 << 12;
/// The most dimensions a tensor may have (ours have one or two).
const MAX_RANK: usize = 8;

/// The size in bits of one element of each dtype the safetensors format defines.
fn dtype_bits(dtype: &str) -> Option<usize> {
    Some(match dtype {
        "F4" => 4,
        "F6_E2M3" | "F6_E3M2" => 6,
        "BOOL" | "U8" | "I8" | "F8_E5M2" | "F8_E4M3" | "F8_E8M0" | "F8_E4M3FNUZ"
        | "F8_E5M2FNUZ" => 8,
        "I16" | "U16" | "F16" | "BF16" => 16,
        "I32" | "U32" | "F32" => 32,
        "I64" | "U64" | "F64" | "C64" => 64,
        _ => return None,
    })
}

/// One tensor's header entry.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct TensorEntry {
    dtype: String,
    #[serde(deserialize_with = "bounded_shape")]
    shape: Vec<usize>,
    data_offsets: [usize; 2],
}

/// A shape of at most [`MAX_RANK`] dimensions, refused as soon as a longer one is seen.
fn bounded_shape<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<usize>, D::Error> {
    struct Shape;
    impl<'de> Visitor<'de> for Shape {
        type Value = Vec<usize>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "a shape: an array of at most {MAX_RANK} sizes")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<usize>, A::Error> {
            let mut shape = Vec::new();
            while let Some(d) = seq.next_element()? {
                if shape.len() == MAX_RANK {
                    return Err(serde::de::Error::custom(format!(
                        "a shape of more than {MAX_RANK} dimensions"
                    )));
                }
                shape.push(d);
            }
            Ok(shape)
        }
    }
    d.deserialize_seq(Shape)
}

/// The JSON header: tensors by name and the `__metadata__` string map, with the counts bounded
/// while parsing (before a hostile header can make them large).
#[derive(Debug, Default)]
struct Header {
    tensors: BTreeMap<String, TensorEntry>,
    metadata: BTreeMap<String, String>,
}

impl<'de> Deserialize<'de> for Header {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Entries;
        impl<'de> Visitor<'de> for Entries {
            type Value = Header;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object of tensors and `__metadata__`")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Header, A::Error> {
                use serde::de::Error as _;
                let mut header = Header::default();
                let mut metadata_seen = false;
                while let Some(key) = map.next_key::<String>()? {
                    if key == METADATA_KEY {
                        if std::mem::replace(&mut metadata_seen, true) {
                            return Err(A::Error::custom("`__metadata__` appears twice"));
                        }
                        header.metadata = map.next_value::<BoundedMetadata>()?.0;
                    } else {
                        if header.tensors.len() == MAX_TENSORS {
                            return Err(A::Error::custom(format!(
                                "more than {MAX_TENSORS} tensors"
                            )));
                        }
                        let entry = map.next_value::<TensorEntry>()?;
                        if header.tensors.contains_key(&key) {
                            return Err(A::Error::custom(format!("tensor `{key}` appears twice")));
                        }
                        header.tensors.insert(key, entry);
                    }
                }
                Ok(header)
            }
        }
        d.deserialize_map(Entries)
    }
}

/// `__metadata__`: at most [`MAX_METADATA_ENTRIES`] string values.
struct BoundedMetadata(BTreeMap<String, String>);

impl<'de> Deserialize<'de> for BoundedMetadata {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Entries;
        impl<'de> Visitor<'de> for Entries {
            type Value = BoundedMetadata;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("`__metadata__`: a JSON object of strings")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<BoundedMetadata, A::Error> {
                use serde::de::Error as _;
                let mut out = BTreeMap::new();
                while let Some(key) = map.next_key::<String>()? {
                    if out.len() == MAX_METADATA_ENTRIES {
                        return Err(A::Error::custom(format!(
                            "more than {MAX_METADATA_ENTRIES} `__metadata__` entries"
                        )));
                    }
                    let value = map.next_value::<String>()?;
                    if out.insert(key, value).is_some() {
                        return Err(A::Error::custom("a `__metadata__` key appears twice"));
                    }
                }
                Ok(BoundedMetadata(out))
            }
        }
        d.deserialize_map(Entries)
    }
}

/// A safetensors file read into memory, its header checked: every tensor's dtype is known and
/// its shape fits its byte range, and the ranges tile the data section exactly, so every later
/// read is in bounds and every allocation sized from a shape is backed by bytes in the file.
#[derive(Debug)]
pub(crate) struct TensorFile {
    path: PathBuf,
    bytes: Vec<u8>,
    data_start: usize,
    tensors: BTreeMap<String, TensorEntry>,
    metadata: BTreeMap<String, String>,
}

impl TensorFile {
    /// Validates a file's bytes; `path` names it in errors. Memory beyond `bytes` is bounded by
    /// the header: its strings, and at most [`MAX_TENSORS`] entries of at most [`MAX_RANK`]
    /// dimensions.
    pub(crate) fn from_bytes(path: &Path, bytes: Vec<u8>) -> Result<Self> {
        let invalid = |problem: String| Error::ModelFile {
            path: path.to_path_buf(),
            problem: format!(
                "not a valid safetensors file ({problem}): it is truncated, corrupt, or not a \
                 model/checkpoint file"
            ),
        };
        let Some(len_bytes) = bytes.first_chunk::<8>() else {
            return Err(invalid(format!(
                "{} bytes, too short for the 8-byte header length",
                bytes.len()
            )));
        };
        let header_len = u64::from_le_bytes(*len_bytes);
        let header_len = usize::try_from(header_len)
            .ok()
            .filter(|&n| n <= MAX_HEADER_BYTES)
            .ok_or_else(|| {
                invalid(format!(
                    "a header of {header_len} bytes, more than the {MAX_HEADER_BYTES} allowed"
                ))
            })?;
        let data_start = 8 + header_len;
        let header = bytes.get(8..data_start).ok_or_else(|| {
            invalid(format!(
                "a header of {header_len} bytes, but only {} bytes follow its length",
                bytes.len() - 8
            ))
        })?;
        let header = std::str::from_utf8(header)
            .map_err(|e| invalid(format!("the header is not UTF-8: {e}")))?;
        let Header { tensors, metadata } = serde_json::from_str(header)
            .map_err(|e| invalid(format!("the header is not valid: {e}")))?;

        // The byte ranges, in order, must tile the data section, each as long as its shape needs.
        let data_len = bytes.len() - data_start;
        let mut by_offset: Vec<(&String, &TensorEntry)> = tensors.iter().collect();
        by_offset.sort_by_key(|(_, t)| t.data_offsets);
        let mut end_of_previous = 0;
        for (name, t) in by_offset {
            let bits = dtype_bits(&t.dtype).ok_or_else(|| {
                invalid(format!("tensor `{name}` has unknown dtype `{}`", t.dtype))
            })?;
            let [start, end] = t.data_offsets;
            if start != end_of_previous || end < start {
                return Err(invalid(format!(
                    "tensor `{name}` has data_offsets [{start}, {end}], but the data before it \
                     ends at {end_of_previous}"
                )));
            }
            let bytes_needed = t
                .shape
                .iter()
                .try_fold(1usize, |acc, &d| acc.checked_mul(d))
                .and_then(|n| n.checked_mul(bits))
                .filter(|nbits| nbits % 8 == 0)
                .map(|nbits| nbits / 8);
            if bytes_needed != Some(end - start) {
                return Err(invalid(format!(
                    "tensor `{name}` of shape {:?} and dtype {} does not fill its {} bytes \
                     (data_offsets [{start}, {end}])",
                    t.shape,
                    t.dtype,
                    end - start
                )));
            }
            end_of_previous = end;
        }
        if end_of_previous != data_len {
            return Err(invalid(format!(
                "the tensors' data ends at byte {end_of_previous} but {data_len} bytes follow the \
                 header"
            )));
        }
        Ok(TensorFile {
            path: path.to_path_buf(),
            bytes,
            data_start,
            tensors,
            metadata,
        })
    }

    /// An error about this file.
    pub(crate) fn error(&self, problem: impl Into<String>) -> Error {
        Error::ModelFile {
            path: self.path.clone(),
            problem: problem.into(),
        }
    }

    /// The header's `__metadata__` string map (empty if there is none).
    pub(crate) fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// A metadata value that must be present.
    pub(crate) fn required_metadata(&self, key: &str, hint: &str) -> Result<&str> {
        self.metadata
            .get(key)
            .map(String::as_str)
            .ok_or_else(|| self.error(format!("no `{key}` metadata: {hint}")))
    }

    /// Tensor names, sorted.
    pub(crate) fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// Checks that tensor `name` is present, F32 and of exactly `shape`, before anything is
    /// allocated for it.
    pub(crate) fn check_f32(&self, name: &str, shape: &[usize]) -> Result<&TensorEntry> {
        let info = self.tensors.get(name).ok_or_else(|| {
            self.error(format!(
                "missing tensor `{name}` (expected shape {shape:?}); the file has {}",
                self.tensors
                    .keys()
                    .map(|k| format!("`{k}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?;
        if info.dtype != "F32" {
            return Err(self.error(format!(
                "tensor `{name}` has dtype {}, expected F32",
                info.dtype
            )));
        }
        if info.shape != shape {
            return Err(self.error(format!(
                "tensor `{name}` has shape {:?}, expected {shape:?}",
                info.shape
            )));
        }
        Ok(info)
    }

    /// Copies the F32 tensor `name`, which must have exactly `shape`, into `out`
    /// (`out.len()` = the shape's product).
    pub(crate) fn read_f32_into(&self, name: &str, shape: &[usize], out: &mut [f32]) -> Result<()> {
        let info = self.check_f32(name, shape)?;
        let [start, end] = info.data_offsets;
        // from_bytes checked that the ranges tile the data section exactly.
        let data = self
            .bytes
            .get(self.data_start + start..self.data_start + end)
            .filter(|data| data.len() == 4 * out.len())
            .ok_or_else(|| {
                self.error(format!(
                    "tensor `{name}`: bytes {start}..{end} do not hold {} values",
                    out.len()
                ))
            })?;
        for (x, b) in out.iter_mut().zip(data.chunks_exact(4)) {
            *x = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
        Ok(())
    }

    /// The number of bytes of tensor data (all tensors together).
    pub(crate) fn data_len(&self) -> usize {
        self.bytes.len() - self.data_start
    }

    /// The number of tensors.
    pub(crate) fn tensor_count(&self) -> usize {
        self.tensors.len()
    }

    /// The shape of tensor `name`, if present.
    pub(crate) fn shape(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|i| i.shape.as_slice())
    }
}

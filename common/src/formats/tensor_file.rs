//! safetensors files of f32 tensors: a deterministic writer and a checking reader, shared by
//! [`save_model`](super::save_model) and [`Checkpoint`](super::Checkpoint).
//!
//! The writer emits the format itself rather than calling `safetensors::serialize`, whose header
//! metadata is a `HashMap` serialised in random order: ours sorts header keys and keeps tensor data
//! in the order given, so the same tensors and metadata always give the same bytes (two runs that
//! end with the same parameters write byte-identical files). Reading goes through the
//! `safetensors` crate, which validates the header and offsets.
//!
//! Layout: an 8-byte little-endian header length N, N bytes of JSON header padded with spaces to
//! a multiple of 8, then the tensors' little-endian bytes back to back.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, TensorInfo};
use serde::Serialize;

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

    let mut out = Vec::with_capacity(8 + header_bytes.len() + offset);
    out.extend((header_bytes.len() as u64).to_le_bytes());
    out.extend(header_bytes);
    for t in tensors {
        out.extend(t.data.iter().flat_map(|x| x.to_le_bytes()));
    }
    out
}

/// A safetensors file read into memory, its header checked.
#[derive(Debug)]
pub(crate) struct TensorFile {
    path: PathBuf,
    bytes: Vec<u8>,
    data_start: usize,
    tensors: BTreeMap<String, TensorInfo>,
    metadata: BTreeMap<String, String>,
}

impl TensorFile {
    /// Reads and validates `path`.
    pub(crate) fn read(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::from_bytes(path, bytes)
    }

    fn from_bytes(path: &Path, bytes: Vec<u8>) -> Result<Self> {
        let (header_len, header) =
            safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| Error::ModelFile {
                path: path.to_path_buf(),
                problem: format!(
                    "not a valid safetensors file ({e}): it is truncated, corrupt, or not a \
                         model/checkpoint file"
                ),
            })?;
        let tensors = header
            .tensors()
            .into_iter()
            .map(|(name, info)| (name, info.clone()))
            .collect();
        let metadata = header
            .metadata()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect();
        Ok(TensorFile {
            path: path.to_path_buf(),
            bytes,
            data_start: 8 + header_len,
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

    /// Copies the F32 tensor `name`, which must have exactly `shape`, into `out`
    /// (`out.len()` = the shape's product).
    pub(crate) fn read_f32_into(&self, name: &str, shape: &[usize], out: &mut [f32]) -> Result<()> {
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
        if info.dtype != Dtype::F32 {
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
        debug_assert_eq!(out.len(), shape.iter().product::<usize>());
        let (start, end) = info.data_offsets;
        // read_metadata checked that the offsets tile the data section exactly.
        let data = &self.bytes[self.data_start + start..self.data_start + end];
        for (x, b) in out.iter_mut().zip(data.chunks_exact(4)) {
            *x = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
        Ok(())
    }

    /// The shape of tensor `name`, if present.
    pub(crate) fn shape(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|i| i.shape.as_slice())
    }
}

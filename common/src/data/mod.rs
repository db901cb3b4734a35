//! Datasets for the trainer: where examples come from, how they are read, and the held-out split.
//!
//! - [`synthetic`]: the built-in default, 70,000 procedurally drawn 28 x 28 shapes (the last
//!   10,000 held out), deterministic from a seed.
//! - [`idx`](load_idx) and [`npy`](load_npy) files, read whole and validated (magic, header,
//!   dtype, shape, byte counts): a malformed file is an error naming it, never a guess. Sizes in
//!   a header are checked against the bytes present before anything is allocated from them, and
//!   gzipped files are decompressed no further than their header declares, nor past a cap
//!   ([`DEFAULT_GZIP_MAX_BYTES`], or [`GZIP_MAX_ENV`]).
//! - `Mnist`: downloaded once into a cache directory and checked against known MD5 sums (with
//!   the `download` feature, on by default; `gzip`, also on by default, reads gzipped files).
//! - [`DataSource`]: the command-line form of all of these (`synthetic`, `idx:IMAGES[,LABELS]`,
//!   `npy:PATH[,LABELS]`, `mnist[:DIR]`), with each source's default held-out size.
//!
//! Every source yields a [`Dataset`]: `n` images as f32 pixels in a row-major `[n, D]` matrix.
//!
//! ```
//! use common::model::Likelihood;
//! use common::data::DataSource;
//!
//! let source: DataSource = "synthetic".parse()?;
//! let data = common::data::synthetic_with(100, 0); // source.load() gives all 70,000
//! data.check_fits(&Likelihood::Bernoulli, 784)?;
//! let (train, held_out) = data.split_holdout(10)?;
//! assert_eq!((train.len(), held_out.len(), train.dim()), (90, 10, 784));
//! assert_eq!(source.default_holdout(70_000), 10_000);
//! # Ok::<(), common::Error>(())
//! ```

mod dataset;
mod file;
mod idx;
#[cfg(feature = "download")]
mod mnist;
mod npy;
mod source;
mod synthetic;

pub use dataset::Dataset;
pub use file::{DEFAULT_GZIP_MAX_BYTES, GZIP_MAX_ENV, gunzip_capped, gzip_max_bytes};
pub use idx::{IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC, idx_from_bytes, load_idx};
#[cfg(feature = "download")]
pub use mnist::{DEFAULT_MIRROR, Fetched, MIRROR_ENV, Mnist, MnistFiles, RemoteFile, md5_of_file};
pub use npy::{load_npy, npy_from_bytes};
pub use source::{DATA_SOURCE_FORMS, DataSource, default_cache_dir};
pub use synthetic::{
    DEFAULT_SYNTHETIC_SEED, INTENSITY_RANGE, SIDE, SIZE_RANGE, STROKE_RANGE, SYNTHETIC_HELDOUT,
    SYNTHETIC_TRAIN, Shape, ShapeParams, synthetic, synthetic_with,
};

//! [`DataSource`]: where the training data comes from, as given on the command line.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use super::{
    DEFAULT_SYNTHETIC_SEED, Dataset, SYNTHETIC_HELDOUT, SYNTHETIC_TRAIN, load_idx, load_npy,
    synthetic, synthetic_with,
};
use crate::{Error, Result};

/// Held-out examples of the canonical splits (MNIST's test set; the synthetic data's tail).
const CANONICAL_HELDOUT: usize = SYNTHETIC_HELDOUT;

/// The forms [`DataSource::from_str`] accepts, for error messages and `--help`.
pub const DATA_SOURCE_FORMS: &str = "`synthetic` (built-in shapes, the default) or \
     `synthetic:N` (its first N examples), `idx:IMAGES[,LABELS]` (IDX files, raw or gzipped), `npy:IMAGES.npy[,LABELS.npy]`, \
     `mnist` (downloaded into the cache directory) or `mnist:DIR`";

/// A dataset to load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataSource {
    /// The built-in procedurally generated shapes: 60,000 + 10,000 held out.
    /// `examples` of them (70,000 by default: 60,000 + 10,000 held out).
    Synthetic { examples: usize },
    /// IDX image (and label) files.
    Idx {
        images: PathBuf,
        labels: Option<PathBuf>,
    },
    /// A `.npy` image array (and label array).
    Npy {
        path: PathBuf,
        labels: Option<PathBuf>,
    },
    /// MNIST, downloaded into `dir` when missing.
    Mnist { dir: PathBuf },
}

impl Default for DataSource {
    fn default() -> Self {
        DataSource::Synthetic {
            examples: SYNTHETIC_TRAIN + SYNTHETIC_HELDOUT,
        }
    }
}

impl DataSource {
    /// Reads (or generates, or downloads and reads) the whole dataset.
    pub fn load(&self) -> Result<Dataset> {
        match self {
            DataSource::Synthetic { examples }
                if *examples == SYNTHETIC_TRAIN + SYNTHETIC_HELDOUT =>
            {
                Ok(synthetic(DEFAULT_SYNTHETIC_SEED))
            }
            DataSource::Synthetic { examples } => {
                Ok(synthetic_with(*examples, DEFAULT_SYNTHETIC_SEED))
            }
            DataSource::Idx { images, labels } => load_idx(images, labels.as_deref()),
            DataSource::Npy { path, labels } => load_npy(path, labels.as_deref()),
            DataSource::Mnist { dir } => load_mnist(dir),
        }
    }

    /// How many examples to hold out by default from a dataset of `total`: the canonical test
    /// split (10,000) for `synthetic` and `mnist`, a tenth (at least one) otherwise, or when the
    /// dataset is too small for the canonical split.
    pub fn default_holdout(&self, total: usize) -> usize {
        match self {
            DataSource::Synthetic { .. } | DataSource::Mnist { .. }
                if total > CANONICAL_HELDOUT =>
            {
                CANONICAL_HELDOUT
            }
            _ => (total / 10).max(1),
        }
    }

    /// One line for logs and run metadata.
    pub fn describe(&self) -> String {
        let labels = |l: &Option<PathBuf>| match l {
            Some(p) => format!(" with labels {}", p.display()),
            None => " (unlabelled)".to_string(),
        };
        match self {
            DataSource::Synthetic { examples } => {
                format!("synthetic 28x28 shapes ({examples} examples)")
            }
            DataSource::Idx { images, labels: l } => {
                format!("IDX images {}{}", images.display(), labels(l))
            }
            DataSource::Npy { path, labels: l } => {
                format!(".npy images {}{}", path.display(), labels(l))
            }
            DataSource::Mnist { dir } => format!(
                "MNIST (60,000 training then 10,000 test images) in {}",
                dir.display()
            ),
        }
    }
}

/// MNIST from `dir`, downloaded into it when missing.
#[cfg(feature = "download")]
fn load_mnist(dir: &Path) -> Result<Dataset> {
    super::Mnist::new(dir).load()
}

/// Built without the `download` feature: refused, saying what to do instead.
#[cfg(not(feature = "download"))]
fn load_mnist(dir: &Path) -> Result<Dataset> {
    Err(Error::Config(format!(
        "this build cannot download MNIST (common's `download` feature is off): put the four \
         MNIST files in {} yourself and use `idx:IMAGES[,LABELS]`, or train on `synthetic`",
        dir.display()
    )))
}

/// Where `mnist` without a directory keeps its files: `$XDG_CACHE_HOME/vae-dist/mnist`, or
/// `~/.cache/vae-dist/mnist`. `None` if neither variable is set.
pub fn default_cache_dir() -> Option<PathBuf> {
    let xdg = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute());
    let base = xdg.or_else(|| {
        std::env::var_os("HOME")
            .filter(|h| !h.is_empty())
            .map(|h| Path::new(&h).join(".cache"))
    })?;
    Some(base.join("vae-dist").join("mnist"))
}

impl FromStr for DataSource {
    type Err = Error;

    /// Parses `synthetic`, `synthetic:N` (its first N examples), `idx:IMAGES[,LABELS]`, `npy:PATH[,LABELS]`, `mnist`
    /// or `mnist:DIR`. (A comma separates images from labels, so an image path cannot contain one.)
    fn from_str(s: &str) -> Result<Self> {
        let unknown = || {
            Error::Config(format!(
                "unknown data source `{s}`: use {DATA_SOURCE_FORMS}"
            ))
        };
        let (kind, arg) = match s.split_once(':') {
            Some((kind, arg)) => (kind, Some(arg)),
            None => (s, None),
        };
        let empty = |what: &str| {
            Error::Config(format!(
                "data source `{s}` names no {what}: use {DATA_SOURCE_FORMS}"
            ))
        };
        // `PATH[,LABELS]`, both non-empty.
        let paths = |arg: Option<&str>| -> Result<(PathBuf, Option<PathBuf>)> {
            let arg = arg.filter(|a| !a.is_empty()).ok_or_else(|| empty("file"))?;
            match arg.split_once(',') {
                None => Ok((arg.into(), None)),
                Some((images, labels)) if !images.is_empty() && !labels.is_empty() => {
                    Ok((images.into(), Some(labels.into())))
                }
                Some(_) => Err(empty("file on one side of the comma")),
            }
        };
        match kind.trim() {
            "synthetic" => match arg {
                None => Ok(DataSource::default()),
                Some(n) => n
                    .trim()
                    .parse()
                    .ok()
                    .filter(|&n: &usize| n > 0)
                    .map(|examples| DataSource::Synthetic { examples })
                    .ok_or_else(|| {
                        Error::Config(format!(
                            "`{s}`: the synthetic size must be a positive number of examples"
                        ))
                    }),
            },
            "idx" => paths(arg).map(|(images, labels)| DataSource::Idx { images, labels }),
            "npy" => paths(arg).map(|(path, labels)| DataSource::Npy { path, labels }),
            "mnist" => match arg {
                Some(dir) if !dir.is_empty() => Ok(DataSource::Mnist { dir: dir.into() }),
                Some(_) => Err(empty("directory")),
                None => default_cache_dir()
                    .map(|dir| DataSource::Mnist { dir })
                    .ok_or_else(|| {
                        Error::Config(
                            "`mnist` needs a cache directory but neither XDG_CACHE_HOME nor HOME \
                             is set: name one with `mnist:DIR`"
                                .into(),
                        )
                    }),
            },
            _ => Err(unknown()),
        }
    }
}

impl fmt::Display for DataSource {
    /// The form [`DataSource::from_str`] reads back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let with_labels = |f: &mut fmt::Formatter<'_>, l: &Option<PathBuf>| match l {
            Some(l) => write!(f, ",{}", l.display()),
            None => Ok(()),
        };
        match self {
            DataSource::Synthetic { .. } if *self == DataSource::default() => {
                write!(f, "synthetic")
            }
            DataSource::Synthetic { examples } => write!(f, "synthetic:{examples}"),
            DataSource::Idx { images, labels } => {
                write!(f, "idx:{}", images.display())?;
                with_labels(f, labels)
            }
            DataSource::Npy { path, labels } => {
                write!(f, "npy:{}", path.display())?;
                with_labels(f, labels)
            }
            DataSource::Mnist { dir } => write!(f, "mnist:{}", dir.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form_and_prints_it_back() {
        for (text, expected) in [
            ("synthetic", DataSource::default()),
            ("synthetic:700", DataSource::Synthetic { examples: 700 }),
            (
                "idx:a/img.gz",
                DataSource::Idx {
                    images: "a/img.gz".into(),
                    labels: None,
                },
            ),
            (
                "idx:img,lab",
                DataSource::Idx {
                    images: "img".into(),
                    labels: Some("lab".into()),
                },
            ),
            (
                "npy:x.npy,y.npy",
                DataSource::Npy {
                    path: "x.npy".into(),
                    labels: Some("y.npy".into()),
                },
            ),
            (
                "mnist:/data/m",
                DataSource::Mnist {
                    dir: "/data/m".into(),
                },
            ),
        ] {
            let parsed: DataSource = text.parse().unwrap();
            assert_eq!(parsed, expected, "{text}");
            assert_eq!(parsed.to_string(), text);
        }
    }

    #[test]
    fn rejects_unknown_and_incomplete_forms_listing_the_accepted_ones() {
        for bad in [
            "cifar",
            "idx",
            "idx:",
            "npy:,y.npy",
            "idx:a,",
            "mnist:",
            "synthetic:x",
            "synthetic:0",
            "",
        ] {
            let msg = bad.parse::<DataSource>().unwrap_err().to_string();
            assert!(msg.contains(bad), "{msg}");
            if !bad.starts_with("synthetic") {
                assert!(msg.contains("idx:IMAGES[,LABELS]"), "{msg}");
            }
        }
    }

    #[test]
    fn default_holdout_is_the_canonical_test_split_or_a_tenth() {
        let synthetic = DataSource::default();
        let idx: DataSource = "idx:x".parse().unwrap();
        assert_eq!(synthetic.default_holdout(70_000), 10_000);
        assert_eq!(
            DataSource::Mnist { dir: "d".into() }.default_holdout(70_000),
            10_000
        );
        assert_eq!(idx.default_holdout(10_000), 1_000);
        assert_eq!(idx.default_holdout(5), 1);
        assert_eq!(synthetic.default_holdout(500), 50);
    }
}

//! MNIST: downloaded once into a cache directory, checked against known MD5 sums, then read as IDX.
//!
//! The loaded dataset is the 60,000 training images followed by the 10,000 test images, so the
//! default held-out tail of 10,000 is exactly the canonical test split.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use md5::{Digest, Md5};

use super::{Dataset, load_idx};
use crate::{Error, Result};

/// Where the files come from unless [`MIRROR_ENV`] says otherwise (the mirror torchvision uses).
pub const DEFAULT_MIRROR: &str = "https://ossci-datasets.s3.amazonaws.com/mnist/";
/// Environment variable overriding [`DEFAULT_MIRROR`]: a base URL the file names are appended to.
pub const MIRROR_ENV: &str = "VAE_MNIST_MIRROR";
/// Give up connecting after this long: a reachable server answers in well under a second, and an
/// offline machine should hear about it quickly.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);
/// Give up when the connection stalls this long without a byte; a slow but live link (the largest
/// file is ~10 MB) keeps going.
const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// The most bytes accepted for one file (MNIST's largest, `train-images-idx3-ubyte.gz`, is 9.9 MB;
/// Fashion-MNIST's 26 MB): a mirror streaming without end cannot fill the disk.
const MAX_DOWNLOAD_BYTES: u64 = 64 << 20;

/// One file of a remote dataset: its name under the mirror URL and its expected MD5 (hex).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteFile {
    pub name: String,
    pub md5: String,
}

impl RemoteFile {
    pub fn new(name: impl Into<String>, md5: impl Into<String>) -> Self {
        RemoteFile {
            name: name.into(),
            md5: md5.into(),
        }
    }
}

/// The four MNIST files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MnistFiles {
    pub train_images: RemoteFile,
    pub train_labels: RemoteFile,
    pub test_images: RemoteFile,
    pub test_labels: RemoteFile,
}

impl MnistFiles {
    /// The published files with torchvision's checksums (the test ones confirmed against a local
    /// copy of the distribution).
    pub fn official() -> Self {
        MnistFiles {
            train_images: RemoteFile::new(
                "train-images-idx3-ubyte.gz",
                "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            ),
            train_labels: RemoteFile::new(
                "train-labels-idx1-ubyte.gz",
                "d53e105ee54ea40749a09fcbcd1e9432",
            ),
            test_images: RemoteFile::new(
                "t10k-images-idx3-ubyte.gz",
                "9fb629c4189551a2d022fa330f9573f3",
            ),
            test_labels: RemoteFile::new(
                "t10k-labels-idx1-ubyte.gz",
                "ec29112dd5afa0611ce80d1b7f02629c",
            ),
        }
    }

    /// The four files in download order.
    pub fn all(&self) -> [&RemoteFile; 4] {
        [
            &self.train_images,
            &self.train_labels,
            &self.test_images,
            &self.test_labels,
        ]
    }
}

/// What [`Mnist::fetch`] did: file names downloaded, and names already present and intact.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fetched {
    pub downloaded: Vec<String>,
    pub reused: Vec<String>,
}

/// MNIST in a cache directory, fetched from a mirror when missing or corrupt.
#[derive(Debug, Clone)]
pub struct Mnist {
    /// Where the four `.gz` files live.
    pub dir: PathBuf,
    /// Base URL; each file's name is appended to it.
    pub mirror: String,
    pub files: MnistFiles,
}

impl Mnist {
    /// The official files in `dir`, from `$VAE_MNIST_MIRROR` or else [`DEFAULT_MIRROR`].
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        let mirror = std::env::var(MIRROR_ENV)
            .ok()
            .filter(|m| !m.trim().is_empty())
            .unwrap_or_else(|| DEFAULT_MIRROR.to_string());
        Mnist {
            dir: dir.into(),
            mirror,
            files: MnistFiles::official(),
        }
    }

    /// Makes sure every file is in [`Mnist::dir`] with the right checksum: verifies the ones
    /// present, downloads the missing or corrupt ones (to a temporary file, renamed into place
    /// only once its checksum is right).
    pub fn fetch(&self) -> Result<Fetched> {
        let mut fetched = Fetched::default();
        for file in self.files.all() {
            let path = self.dir.join(&file.name);
            if path.exists() {
                let actual = md5_of_file(&path)?;
                if actual.eq_ignore_ascii_case(&file.md5) {
                    fetched.reused.push(file.name.clone());
                    continue;
                }
                tracing::warn!(
                    "{}: MD5 {actual} is not the expected {}: the file is corrupt or incomplete, \
                     downloading it again",
                    path.display(),
                    file.md5
                );
            }
            self.download(file)?;
            fetched.downloaded.push(file.name.clone());
        }
        Ok(fetched)
    }

    /// Fetches what is missing, then loads training images followed by test images.
    pub fn load(&self) -> Result<Dataset> {
        self.fetch()?;
        let path = |f: &RemoteFile| self.dir.join(&f.name);
        let f = &self.files;
        let train = load_idx(&path(&f.train_images), Some(&path(&f.train_labels)))?;
        let test = load_idx(&path(&f.test_images), Some(&path(&f.test_labels)))?;
        train.concat(test)
    }

    /// The URL of `file` on the mirror.
    pub fn url(&self, file: &RemoteFile) -> String {
        format!("{}/{}", self.mirror.trim_end_matches('/'), file.name)
    }

    fn download(&self, file: &RemoteFile) -> Result<()> {
        let url = self.url(file);
        std::fs::create_dir_all(&self.dir).map_err(|e| Error::io(&self.dir, e))?;
        tracing::info!("downloading {url} into {}", self.dir.display());
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_connect(Some(CONNECT_TIMEOUT))
            .timeout_per_read(Some(READ_TIMEOUT))
            // The bytes as stored: their MD5 is what we check.
            .accept_encoding("identity")
            .build()
            .into();
        let response = agent
            .get(&url)
            .call()
            .map_err(|e| self.unreachable(&url, &e.to_string()))?;
        let mut body = response.into_body().into_reader();
        let mut tmp = tempfile::Builder::new()
            .prefix(&format!(".{}.", file.name))
            .suffix(".part")
            .tempfile_in(&self.dir)
            .map_err(|e| Error::io(&self.dir, e))?;
        let mut hasher = Md5::new();
        let mut buf = vec![0u8; 1 << 16];
        let mut received = 0u64;
        loop {
            let n = match body.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.unreachable(&url, &format!("download cut off: {e}"))),
            };
            received += n as u64;
            if received > MAX_DOWNLOAD_BYTES {
                return Err(Error::Download(format!(
                    "{url} sent more than {MAX_DOWNLOAD_BYTES} bytes for {}, far more than \
                     any MNIST-style file (under 30 MB): the mirror serves something else; try \
                     another mirror with {MIRROR_ENV}",
                    file.name
                )));
            }
            hasher.update(&buf[..n]);
            tmp.write_all(&buf[..n])
                .map_err(|e| Error::io(tmp.path(), e))?;
        }
        let actual = hex::encode(hasher.finalize());
        if !actual.eq_ignore_ascii_case(&file.md5) {
            return Err(Error::Download(format!(
                "{url} sent a file with MD5 {actual}, but {} should have MD5 {}: the mirror \
                 serves something else (an error page? a different version?). Try another \
                 mirror with {MIRROR_ENV}",
                file.name, file.md5
            )));
        }
        let path = self.dir.join(&file.name);
        tmp.as_file()
            .sync_all()
            .map_err(|e| Error::io(tmp.path(), e))?;
        tmp.persist(&path).map_err(|e| Error::io(&path, e.error))?;
        Ok(())
    }

    /// The error for a failed download: which URL, why, and how to do it by hand.
    fn unreachable(&self, url: &str, why: &str) -> Error {
        let listing: Vec<String> = self
            .files
            .all()
            .iter()
            .map(|f| {
                let present = md5_of_file(&self.dir.join(&f.name))
                    .is_ok_and(|m| m.eq_ignore_ascii_case(&f.md5));
                format!(
                    "  {}  (MD5 {}){}",
                    f.name,
                    f.md5,
                    if present { "  already there" } else { "" }
                )
            })
            .collect();
        Error::Download(format!(
            "could not fetch {url}: {why}\nTo use MNIST without network access, download these \
             files (from {} or any MNIST mirror) on a machine with internet access and copy them, still \
             gzipped, into {}:\n{}\nThey are checked against these MD5 sums. Or set {MIRROR_ENV} \
             to a mirror you can reach, or train on the built-in `synthetic` data.",
            self.mirror,
            self.dir.display(),
            listing.join("\n")
        ))
    }
}

/// MD5 of a file's bytes, lower-case hex.
pub fn md5_of_file(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut hasher = Md5::new();
    std::io::copy(&mut file, &mut hasher).map_err(|e| Error::io(path, e))?;
    Ok(hex::encode(hasher.finalize()))
}

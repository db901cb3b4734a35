//! Crash-safe file replacement: readers see the old file or the new one, never half of either.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::{Error, Result};

/// Distinguishes temporary files of concurrent writers within one process.
static COUNTER: AtomicU64 = AtomicU64::new(0);

/// Writes `bytes` to `path` atomically: to a temporary file in the same directory (so the rename
/// cannot cross file systems), fsync it, rename it over `path`, then fsync the directory so the
/// rename itself survives a crash. On failure the temporary file is removed and `path` is
/// untouched.
///
/// The temporary file is named `.{file name}.tmp.{pid}.{n}`, with the first `n` whose name is
/// free.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |file| file.write_all(bytes))
}

/// [`write_atomic`] of what `write` writes to the temporary file (which may be large: a
/// checkpoint streams its tensors instead of first building the whole file in memory).
pub fn write_atomic_with(
    path: &Path,
    write: impl FnOnce(&mut File) -> std::io::Result<()>,
) -> Result<()> {
    let file_name = path.file_name().ok_or_else(|| {
        Error::io(
            path,
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "not a file path (it has no file name)",
            ),
        )
    })?;
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    // A name can be taken by another process with our pid: a dead one whose file was left when
    // it was killed mid-write (a restarted container's first process is pid 1 again, its
    // counter 0 again), or a live one in another pid namespace sharing the directory. Neither's
    // file is ours to remove, so the next number is tried (a bounded number of times).
    let mut attempts = 0;
    let (tmp, mut file) = loop {
        attempts += 1;
        let tmp = dir.join(format!(
            ".{}.tmp.{}.{}",
            file_name.to_string_lossy(),
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        match OpenOptions::new().write(true).create_new(true).open(&tmp) {
            Ok(file) => break (tmp, file),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempts < 1000 => {}
            Err(e) => return Err(Error::io(&tmp, e)),
        }
    };
    let guard = RemoveOnDrop(Some(tmp.clone()));
    write(&mut file).map_err(|e| Error::io(&tmp, e))?;
    file.sync_all().map_err(|e| Error::io(&tmp, e))?;
    drop(file);
    fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
    guard.disarm();
    // Persist the directory entry. Opening a directory read-only and fsyncing it is how POSIX
    // does this; platforms that cannot (Windows) make the rename durable by themselves.
    if let Ok(dir_file) = File::open(dir) {
        dir_file.sync_all().map_err(|e| Error::io(dir, e))?;
    }
    Ok(())
}

/// Deletes the temporary file unless the rename succeeded.
struct RemoveOnDrop(Option<PathBuf>);

impl RemoveOnDrop {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn replaces_the_file_and_leaves_no_temporary_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.bin");
        write_atomic(&path, b"first").unwrap();
        write_atomic(&path, b"second").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"second");
        assert_eq!(entries(dir.path()), ["out.bin"]);
    }

    #[test]
    fn failure_leaves_the_target_and_no_temporary_files() {
        let dir = tempfile::tempdir().unwrap();
        // Renaming a file over a non-empty directory fails after the temporary file is written.
        let path = dir.path().join("occupied");
        fs::create_dir(&path).unwrap();
        fs::write(path.join("keep"), b"x").unwrap();
        let err = write_atomic(&path, b"data").unwrap_err();
        assert!(err.to_string().contains("occupied"), "{err}");
        assert_eq!(entries(dir.path()), ["occupied"]);
        assert_eq!(fs::read(path.join("keep")).unwrap(), b"x");
    }

    /// A streamed write that fails part way (a full disk, say) leaves the old file and no
    /// temporary one, and the error names the file.
    #[test]
    fn a_failed_streamed_write_leaves_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.bin");
        write_atomic(&path, b"old").unwrap();
        let err = write_atomic_with(&path, |file| {
            file.write_all(b"half of the new")?;
            Err(std::io::Error::other("no space left"))
        })
        .unwrap_err();
        assert!(err.to_string().contains("no space left"), "{err}");
        assert!(err.to_string().contains("out.bin"), "{err}");
        assert_eq!(fs::read(&path).unwrap(), b"old");
        assert_eq!(entries(dir.path()), ["out.bin"]);
    }

    /// A process killed mid-write leaves its temporary file; a later process with the same pid
    /// (a restarted container's pid 1) reaches the same name and must neither fail on it nor
    /// touch it (it could be a live writer's in another pid namespace).
    #[test]
    fn a_taken_temporary_name_is_skipped_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.bin");
        // The next names the call can take (other tests' writes also advance the counter).
        let next = COUNTER.load(Ordering::Relaxed);
        let taken = |n: u64| {
            dir.path()
                .join(format!(".out.bin.tmp.{}.{n}", std::process::id()))
        };
        for n in next..next + 20 {
            fs::write(taken(n), b"half a checkpoint").unwrap();
        }
        write_atomic(&path, b"whole").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"whole");
        assert_eq!(
            entries(dir.path()).len(),
            21,
            "the taken names are untouched"
        );
        for n in next..next + 20 {
            assert_eq!(fs::read(taken(n)).unwrap(), b"half a checkpoint");
        }
    }

    #[test]
    fn missing_directory_is_a_named_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("no/such/dir/out.bin");
        let err = write_atomic(&path, b"data").unwrap_err();
        assert!(err.to_string().contains("no/such/dir"), "{err}");
    }
}

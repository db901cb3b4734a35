//! Checkpoints written beside training instead of in its way.
//!
//! A checkpoint is a snapshot taken under the state lock (a copy of the parameters, the optimizer
//! state and the position, into the previous checkpoint's buffers: under a millisecond for the
//! default model), then hashed, streamed to disk and synced on a blocking thread while steps go
//! on. Written in line, every `--checkpoint-every` steps stalled the run for the whole write
//! (about 25 ms on a 2-core VM, ten steps of the default model: docs/scaling.md §21).
//!
//! At most one write is in flight: each rotates the newest file into the previous one's place,
//! so two at once could leave the older snapshot newest. The driver looks for an ended write
//! ([`CheckpointWriter::write_done`]) each time it wakes, and waits for the write in flight before
//! the next checkpoint and at the end of the run; a write's error then fails the run, after the
//! newest snapshot is written (a stop or a failure only logs it and writes its own).
//! Every file on disk is whole (each is written to a temporary name and renamed).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use common::formats::Checkpoint;
use tokio::task::JoinHandle;

use crate::{Error, Result, outputs};

/// The checkpoint write in flight, if any.
#[derive(Debug, Default)]
pub struct CheckpointWriter {
    in_flight: Option<InFlight>,
    /// The last written checkpoint, handed back by its write for the next snapshot to copy into
    /// ([`CheckpointWriter::take_spare`]). It stays allocated between checkpoints: one more copy of
    /// the parameters and the optimizer's moments (10 MB for the default model) for the run.
    spare: Arc<Mutex<Option<Checkpoint>>>,
}

#[derive(Debug)]
struct InFlight {
    global_step: u64,
    write: JoinHandle<Result<()>>,
}

impl CheckpointWriter {
    /// Waits for the write in flight, then starts writing `checkpoint` into `dir` whatever became
    /// of it. Returns how that earlier write ended, as [`CheckpointWriter::finish`] does.
    pub async fn start(&mut self, dir: PathBuf, checkpoint: Checkpoint) -> Result<Option<u64>> {
        let earlier = self.finish().await;
        let global_step = checkpoint.global_step;
        let spare = Arc::clone(&self.spare);
        let write = tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let saved = outputs::save_checkpoint(&dir, &checkpoint);
            *spare
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(checkpoint);
            saved.map_err(|e| {
                Error::Io(format!(
                    "the checkpoint of global step {global_step} could not be written ({e}); \
                     --resume continues from the newest readable checkpoint in {}, if any",
                    dir.display()
                ))
            })?;
            tracing::debug!(
                "checkpoint of global step {global_step} written in {:.1} ms",
                started.elapsed().as_secs_f64() * 1e3
            );
            Ok(())
        });
        self.in_flight = Some(InFlight { global_step, write });
        earlier
    }

    /// The buffers of the last checkpoint written (or not, after an error), if its write has
    /// ended and they were not taken yet. A snapshot copies into them: its lock is then held for
    /// a copy alone, not also for faulting in fresh pages (about 3 ms of the default model on a
    /// 2-core VM, during which the step waited; docs/scaling.md §29).
    pub fn take_spare(&self) -> Option<Checkpoint> {
        self.spare
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take()
    }

    /// Whether a write was started and has ended (well or not): [`CheckpointWriter::finish`]
    /// then returns at once.
    pub fn write_done(&self) -> bool {
        self.in_flight
            .as_ref()
            .is_some_and(|f| f.write.is_finished())
    }

    /// Waits for the write in flight; returns its global step once it is on disk (`None` when
    /// nothing was in flight), or its error.
    pub async fn finish(&mut self) -> Result<Option<u64>> {
        let Some(InFlight { global_step, write }) = self.in_flight.take() else {
            return Ok(None);
        };
        write
            .await
            .map_err(|e| Error::Io(format!("checkpoint writer panicked: {e}")))??;
        Ok(Some(global_step))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outputs::tests::checkpoint;

    #[tokio::test]
    async fn each_write_completes_before_the_next_starts_and_the_newest_wins() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = CheckpointWriter::default();
        assert!(!writer.write_done(), "nothing started");
        assert_eq!(writer.finish().await.unwrap(), None);
        assert_eq!(
            writer
                .start(dir.path().into(), checkpoint(1))
                .await
                .unwrap(),
            None
        );
        assert_eq!(
            writer
                .start(dir.path().into(), checkpoint(2))
                .await
                .unwrap(),
            Some(1)
        );
        while !writer.write_done() {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        assert_eq!(writer.finish().await.unwrap(), Some(2));
        // The ended write handed its buffers back, once, for the next snapshot to copy into.
        let spare = writer
            .take_spare()
            .expect("the written checkpoint comes back");
        assert_eq!((spare.global_step, spare.params), (2, vec![2.0; 8]));
        assert!(writer.take_spare().is_none(), "taken");
        assert!(!writer.write_done(), "nothing in flight");
        assert_eq!(writer.finish().await.unwrap(), None);
        let loaded = outputs::load_checkpoint(dir.path()).unwrap().unwrap();
        assert_eq!(loaded.checkpoint.global_step, 2);
        assert_eq!(loaded.checkpoint.params, vec![2.0; 8]);
        let previous = Checkpoint::load(&dir.path().join(outputs::PREV_CHECKPOINT_FILE)).unwrap();
        assert_eq!(previous.global_step, 1);
    }

    #[tokio::test]
    async fn a_failed_write_is_reported_when_the_writer_is_next_used() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no-such-directory");
        let mut writer = CheckpointWriter::default();
        writer.start(missing.clone(), checkpoint(1)).await.unwrap();
        while !writer.write_done() {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        let spare = writer
            .take_spare()
            .expect("a failed write hands its buffers back too");
        assert_eq!(spare.global_step, 1);
        let err = writer
            .start(dir.path().into(), checkpoint(2))
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("global step 1")
                && err.to_string().contains("No such file or directory"),
            "the error names the step and the cause: {err}"
        );
        // The failed write is consumed; the writer goes on.
        writer
            .start(dir.path().into(), checkpoint(3))
            .await
            .unwrap();
        assert_eq!(writer.finish().await.unwrap(), Some(3));
    }
}

//! Tensors between processes on one host through files in a memory-backed directory (`/dev/shm`),
//! the way NCCL and MPI move data within a node: a parameter vector is written once per step and
//! read in place by every co-located worker, a gradient is written by its worker and read by the
//! coordinator, each one copy into or out of the page cache instead of a trip through prost,
//! HTTP/2 and the loopback socket (docs/design.md §5).
//!
//! Files are mapped into memory (`mmap`), so a transfer is at most one `memcpy` into or out of the
//! mapping (the page cache's per-page `pread`/`pwrite` path measured ~10x slower here). A worker
//! computes its gradients in place in its own file ([`SharedClient::fill_gradients`]), and the
//! coordinator reads them there ([`SharedDir::map_gradient`]). No reference into memory another
//! process still writes ever reaches the rest of the program: a gradient's values are only
//! measured, copied out or added into a sum, each measured as it is made ([`MappedValues`], which
//! implements `common::train::SharedValues`); a parameter file's are borrowed only under a lock its
//! writer respects (below); shard files, never written again once in place, are read where they
//! are. The data plane's only `unsafe` memory access is the [`mapping`] module; its invariants are
//! stated there. What keeps the exchange correct:
//! - Parameters go into one of [`PARAM_SLOTS`] parameter files, in turn, each with a header
//!   naming the step they are for. A worker computes from the file where it is, holding a shared
//!   `flock` on it from before it checks the header until its gradients are done; the coordinator
//!   writes a file only under an exclusive lock it takes without waiting, skipping files a worker
//!   still holds (a straggler). So no parameter is rewritten while a worker reads it, a worker
//!   that finds another step in the header knows its task is stale, and a worker that holds a file
//!   forever only costs the coordinator that file (all of them held: parameters go inline).
//! - A worker writes its gradient regions, then sends `SubmitResult`. The coordinator measures
//!   them where they are (a result with a non-finite or huge value is rejected then), keeps them
//!   mapped, and the step's update reads them through copies and additions checked again as
//!   they are made. A worker's later tasks in the same step write after the step's earlier
//!   regions, and a new step's start again at byte 0: its tasks exist only once the last step's
//!   update, the last reader, is done. So an honest worker never rewrites a gradient the
//!   coordinator may still read; one that does changes only what a checked read reads: values
//!   that fail the second check are used as zeros and the worker is quarantined
//!   (`common::train::SharedGradient`);
//!   values rewritten within the bound pass unnoticed, as the same values submitted would have.
//!   Under `--verify` every result is copied out on arrival (a rewrite could otherwise escape
//!   the verification of the copy compared).
//! - Which file to read is never taken from a peer: the coordinator reads the gradient file named
//!   after the worker id it issued, a worker one of the [`PARAM_SLOTS`] parameter files of its
//!   offer's directory (a task names the slot, never a path); a region outside the file is an
//!   error, never a short read.
//! - A shard's examples go to an attached worker as a file written once, under a temporary name
//!   renamed into place, and never changed while the run lasts, so the worker maps it and uses
//!   the values where they are (it sees all of the file or none: `ENOENT`), instead of a stream
//!   of gRPC chunks. Shard files may take half of the directory's free space; past that (a
//!   64 MiB Docker `/dev/shm`, say) the remaining shards are streamed.
//! - Whether a worker shares the directory is tested, not assumed: the coordinator writes a random
//!   probe; only a worker that reads it back is attached. Workers in other containers or on other
//!   hosts fail the probe and use inline tensors.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

pub use mapping::MappedValues;
pub(crate) use mapping::SharedMap;
use mapping::{FrozenMap, Lease, LockedMap, ReadMap, WriteMap};

use crate::lock;
use crate::mailbox::Mailbox;
use crate::messages::{SharedMemoryOffer, TensorRef};

/// Where shared-memory directories go when the host has `/dev/shm` (tmpfs on Linux).
pub const DEFAULT_BASE: &str = "/dev/shm";
/// Parameter files the coordinator writes in turn. More than two, so that a straggler still
/// reading an old step's file does not make the coordinator fall back to inline parameters.
/// Part of the wire protocol (a task's slot must be below it): changing it needs a new
/// `PROTOCOL_VERSION`.
pub const PARAM_SLOTS: u32 = 4;
/// Bytes before a parameter file's values: the step they are for and their number (each a
/// little-endian u64); 64 keeps the values on a cache line of their own.
const PARAM_HEADER: u64 = 64;
const PROBE_FILE: &str = "probe";
/// Directory names are `vae-shm-<pid>-<tag>`: the pid lets a later run remove a dead run's files.
const DIR_PREFIX: &str = "vae-shm-";

/// The coordinator's side: a private directory holding the parameter files and one gradient file
/// per attached worker. Removed with its contents when dropped.
#[derive(Debug)]
pub struct SharedDir {
    dir: PathBuf,
    probe: Vec<u8>,
    params: Mutex<ParamFiles>,
    /// Each attached worker's gradient file, mapped on first use. Locked one by one, so that
    /// several workers' gradients are mapped at once (the table's lock is held only to find a
    /// file).
    gradients: Mutex<HashMap<u64, Arc<Mutex<ReadMap>>>>,
    /// The shard files (locked while one is written, so each is written once).
    shards: Mutex<ShardFiles>,
    /// Each attached worker's mailbox (`crate::mailbox`), if one was made for it.
    mailboxes: Mutex<HashMap<u64, Arc<Mailbox>>>,
}

/// The parameter files written so far (created by `SharedDir::prepare_params` or on first use),
/// and which to try first next.
#[derive(Debug, Default)]
struct ParamFiles {
    files: Vec<Option<WriteMap>>,
    next: u32,
}

/// Which shards have a file, and how much more shard data the directory may take.
#[derive(Debug, Default)]
struct ShardFiles {
    written: HashSet<u32>,
    /// Bytes still allowed: half the directory's free space when the first shard is written,
    /// so shards never crowd out the parameter and gradient files of every step.
    budget: Option<u64>,
    /// Why shard files stopped (the first failure or the budget): every later shard is streamed.
    refused: Option<String>,
}

impl SharedDir {
    /// Creates a directory (mode 0700) under `base` with `probe` in its probe file. Directories
    /// left under `base` by runs whose process is gone are removed first.
    pub fn create(base: &Path, tag: &str, probe: &[u8]) -> io::Result<Self> {
        remove_stale(base);
        let dir = base.join(format!("{DIR_PREFIX}{}-{tag}", std::process::id()));
        fs::DirBuilder::new().mode(0o700).create(&dir)?;
        match fs::write(dir.join(PROBE_FILE), probe) {
            Ok(()) => Ok(SharedDir {
                dir,
                probe: probe.to_vec(),
                params: Mutex::new(ParamFiles {
                    files: (0..PARAM_SLOTS).map(|_| None).collect(),
                    next: 0,
                }),
                gradients: Mutex::new(HashMap::new()),
                shards: Mutex::new(ShardFiles::default()),
                mailboxes: Mutex::new(HashMap::new()),
            }),
            Err(e) => {
                let _ = fs::remove_dir_all(&dir);
                Err(e)
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    pub fn offer(&self) -> SharedMemoryOffer {
        SharedMemoryOffer {
            dir: self.dir.clone(),
            probe_file: PROBE_FILE.into(),
        }
    }

    /// Whether `probe` is what this directory's probe file holds (compared in constant time).
    pub fn verify(&self, probe: &[u8]) -> bool {
        probe.len() == self.probe.len()
            && probe
                .iter()
                .zip(&self.probe)
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    }

    /// Writes the parameters of `step` into the next parameter file no worker holds; the
    /// reference goes into every co-located task of the step. `WouldBlock` when workers hold
    /// every file (stragglers that never finish): the caller sends the parameters inline.
    pub fn write_params(&self, step: u64, values: &[f32]) -> io::Result<TensorRef> {
        self.write_params_with(step, values.len(), |file| {
            if let Some(file) = file {
                mapping::copy(bytemuck::cast_slice_mut(file), bytemuck::cast_slice(values));
            }
            true
        })?
        .ok_or_else(|| io::Error::other("the parameters were not written"))
    }

    /// Creates every parameter file for `len` values and writes it once (zeros, naming no step),
    /// so that the run's first steps do not grow, map and first touch one file each: 1-2 ms of
    /// each of steps 0-3 on a 2-core VM (docs/scaling.md §24). A failure (a full `/dev/shm`)
    /// costs nothing but that: the files are then made on first use, as without this.
    pub fn prepare_params(&self, len: usize) -> io::Result<()> {
        let mut params = lock(&self.params);
        for slot in 0..PARAM_SLOTS {
            let path = self.dir.join(param_file(slot));
            let mut zeros = Some(|values: Option<&mut [f32]>| {
                if let Some(values) = values {
                    values.fill(0.0);
                }
                // Declined: the header keeps naming no step, so no task can lease the file.
                false
            });
            write_param_file(
                &mut params.files[slot as usize],
                &path,
                NO_STEP,
                len,
                &mut zeros,
            )?;
        }
        Ok(())
    }

    /// [`Self::write_params`] for `len` values that `fill` writes straight into the file (the
    /// coordinator's optimizer, as it steps each block). `fill` is called exactly once: with the
    /// file's values when a file was taken, and then returns whether it wrote them all; or with
    /// `None` when no file could be taken, and the error follows. `Ok(None)` when `fill` declined:
    /// the file then names no step, so no task can lease it.
    ///
    /// The file's exclusive `flock` is held while `fill` runs: for the optimizer, the whole step
    /// (0.5-1 ms). No task names the file before this returns, so only a straggler still holding
    /// a task from the file's previous use (four steps ago) can meet the lock; it waits that
    /// long and then finds its step gone from the header.
    pub fn write_params_with(
        &self,
        step: u64,
        len: usize,
        fill: impl FnOnce(Option<&mut [f32]>) -> bool,
    ) -> io::Result<Option<TensorRef>> {
        let mut params = lock(&self.params);
        // Why the files tried so far could not be used: a worker holds them, or one cannot grow
        // (a full /dev/shm), in which case the others are still tried.
        let mut failure = io::Error::new(
            io::ErrorKind::WouldBlock,
            format!("workers hold all {PARAM_SLOTS} parameter files"),
        );
        let mut fill = Some(fill);
        for i in 0..PARAM_SLOTS {
            let slot = (params.next + i) % PARAM_SLOTS;
            let path = self.dir.join(param_file(slot));
            match write_param_file(
                &mut params.files[slot as usize],
                &path,
                step,
                len,
                &mut fill,
            ) {
                Ok(Some(filled)) => {
                    params.next = (slot + 1) % PARAM_SLOTS;
                    let len = len as u64;
                    return Ok(filled.then_some(TensorRef::ParameterFile { slot, len }));
                }
                Ok(None) => {}
                Err(e) => failure = e,
            }
        }
        if let Some(fill) = fill.take() {
            fill(None);
        }
        Err(failure)
    }

    /// The `len` values at byte `offset` of `worker`'s gradient file, left where they are (kept
    /// mapped while they live, even after [`SharedDir::forget`]). They are only ever measured
    /// ([`MappedValues::measure`]) or copied out, measured as they are copied
    /// ([`MappedValues::copy_out`], `common::train::SharedValues`): the worker could rewrite
    /// them at any moment.
    pub fn map_gradient(&self, worker: u64, offset: u64, len: u64) -> io::Result<MappedValues> {
        let map = match lock(&self.gradients).entry(worker) {
            std::collections::hash_map::Entry::Occupied(e) => Arc::clone(e.get()),
            std::collections::hash_map::Entry::Vacant(e) => {
                let file = File::open(self.dir.join(gradient_file(worker)))?;
                Arc::clone(e.insert(Arc::new(Mutex::new(ReadMap::new(file)))))
            }
        };
        map_region(&mut lock(&map), offset, len)
    }

    /// Makes sure `shard`'s file holds its examples (`values`, written only the first time),
    /// from byte 0. The file is written once, under a temporary name renamed into place, and
    /// never changed again: a worker that sees it sees all of it. Shard files may take half of
    /// the directory's free space (measured at the first); past that, or after any failure to
    /// write one, every call is an error (and the caller streams the shard instead).
    pub fn write_shard(&self, shard: u32, values: &[f32]) -> io::Result<()> {
        let mut files = lock(&self.shards);
        if files.written.contains(&shard) {
            return Ok(());
        }
        if let Some(why) = &files.refused {
            return Err(io::Error::other(why.clone()));
        }
        let bytes = std::mem::size_of_val(values) as u64;
        let budget = match files.budget {
            Some(budget) => budget,
            None => {
                let stat = rustix::fs::statvfs(&self.dir)?;
                *files
                    .budget
                    .insert(stat.f_bavail.saturating_mul(stat.f_frsize) / 2)
            }
        };
        if bytes > budget {
            let why = format!(
                "shard files would take more than half of the free space in {}",
                self.dir.display()
            );
            files.refused = Some(why.clone());
            return Err(io::Error::new(io::ErrorKind::StorageFull, why));
        }
        let path = self.dir.join(shard_file(shard));
        let partial = self.dir.join(format!("{}.partial", shard_file(shard)));
        let result = private_file(&partial, true)
            .and_then(|mut f| f.write_all(bytemuck::cast_slice(values)))
            .and_then(|()| fs::rename(&partial, &path));
        if let Err(e) = result {
            let _ = fs::remove_file(&partial);
            files.refused = Some(format!("writing shard {shard} failed: {e}"));
            return Err(e);
        }
        files.budget = Some(budget - bytes);
        files.written.insert(shard);
        Ok(())
    }

    /// Whether `shard`'s file is written (no blocking work: the caller may be async).
    pub fn has_shard(&self, shard: u32) -> bool {
        lock(&self.shards).written.contains(&shard)
    }

    /// Makes `worker`'s mailbox, whose replies may be up to `reply_capacity` bytes (a task
    /// with its parameters inline must fit), replacing any earlier one.
    pub fn create_mailbox(&self, worker: u64, reply_capacity: u32) -> io::Result<Arc<Mailbox>> {
        const REQUEST_CAPACITY: u32 = 1 << 20;
        let mut mailboxes = lock(&self.mailboxes);
        let path = self.dir.join(mailbox_file(worker));
        if let Some(old) = mailboxes.remove(&worker) {
            // Closed in its own file, then unlinked: its server and the worker may still map it,
            // so it is never truncated or reused.
            old.close();
            fs::remove_file(&path)?;
        }
        let mailbox = Arc::new(Mailbox::create(&path, REQUEST_CAPACITY, reply_capacity)?);
        mailboxes.insert(worker, Arc::clone(&mailbox));
        Ok(mailbox)
    }

    /// Removes an attached worker's gradient file and closes its mailbox (the worker is gone).
    pub fn forget(&self, worker: u64) {
        // Under the table's lock, so a read cannot map the file again between the two.
        let mut maps = lock(&self.gradients);
        maps.remove(&worker);
        let _ = fs::remove_file(self.dir.join(gradient_file(worker)));
        if let Some(mailbox) = lock(&self.mailboxes).remove(&worker) {
            mailbox.close();
            let _ = fs::remove_file(self.dir.join(mailbox_file(worker)));
        }
    }

    /// Closes every mailbox: the run is over, their threads end.
    pub fn close_mailboxes(&self) {
        for mailbox in lock(&self.mailboxes).values() {
            mailbox.close();
        }
    }
}

impl Drop for SharedDir {
    fn drop(&mut self) {
        self.close_mailboxes();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A worker's side: reads parameters from the offer's directory, writes its own gradient file.
#[derive(Debug)]
pub struct SharedClient {
    dir: PathBuf,
    worker: u64,
    /// The parameter files, each mapped the first time a task names it.
    params: Mutex<Vec<Option<std::sync::Arc<LockedMap>>>>,
    gradients: Mutex<GradientFile>,
}

/// A worker's gradient file and where its next region starts: after the step's earlier regions,
/// which the coordinator may still read until the step's update is done (it reads them where they
/// are, `SharedDir::map_gradient`), or at byte 0 for a new step, whose tasks exist only once the
/// last step's update has made their parameters.
#[derive(Debug)]
struct GradientFile {
    map: WriteMap,
    step: u64,
    next: u64,
}

/// A task's parameters where the coordinator wrote them, locked against rewriting until this is
/// dropped (when the task's gradients are computed).
#[derive(Debug)]
pub struct ParamsLease {
    lease: Lease,
    len: usize,
}

impl ParamsLease {
    pub fn values(&self) -> &[f32] {
        let start = PARAM_HEADER as usize;
        // The mapping is page-aligned, the header a multiple of 4 bytes, and the length checked
        // against the mapping when leased.
        bytemuck::cast_slice(&self.lease.bytes()[start..start + 4 * self.len])
    }
}

impl SharedClient {
    /// Reads the offer's probe (what the worker sends back in `AttachSharedMemory`) and opens the
    /// files. Fails when the directory is not visible from here (another host or container).
    pub fn open(offer: &SharedMemoryOffer, worker: u64) -> io::Result<(Self, Vec<u8>)> {
        let probe = fs::read(offer.dir.join(&offer.probe_file))?;
        let gradients = private_file(&offer.dir.join(gradient_file(worker)), true)?;
        let client = SharedClient {
            dir: offer.dir.clone(),
            worker,
            params: Mutex::new((0..PARAM_SLOTS).map(|_| None).collect()),
            gradients: Mutex::new(GradientFile {
                map: WriteMap::new(gradients),
                step: 0,
                next: 0,
            }),
        };
        Ok((client, probe))
    }

    /// Maps this worker's mailbox, which the coordinator made when it accepted the attachment.
    pub fn open_mailbox(&self) -> io::Result<Mailbox> {
        Mailbox::open(&self.dir.join(mailbox_file(self.worker)))
    }

    /// The `len` parameters of `step` in parameter file `slot`, locked in place (no copy) until
    /// the lease is dropped; `None` when the file holds another step's parameters (the
    /// coordinator has moved on: the task is stale). Waits while the coordinator writes the file.
    pub fn lease_params(&self, slot: u32, step: u64, len: u64) -> io::Result<Option<ParamsLease>> {
        let bytes = len
            .checked_mul(4)
            .and_then(|b| b.checked_add(PARAM_HEADER))
            .ok_or_else(|| outside(PARAM_HEADER, len, None))?;
        let map = {
            let mut maps = lock(&self.params);
            let cached = maps
                .get_mut(slot as usize)
                .ok_or_else(|| io::Error::other(format!("there is no parameter file {slot}")))?;
            match cached {
                // A file only grows: a longer one than mapped is mapped again.
                Some(map) if map.len() as u64 >= bytes => std::sync::Arc::clone(map),
                _ => {
                    let file = File::open(self.dir.join(param_file(slot)))?;
                    std::sync::Arc::clone(cached.insert(std::sync::Arc::new(LockedMap::new(file)?)))
                }
            }
        };
        if (map.len() as u64) < bytes {
            return Err(outside(PARAM_HEADER, len, None));
        }
        let lease = map.lease()?;
        let (written_step, written_len) = read_param_header(lease.bytes());
        if written_step != step {
            return Ok(None);
        }
        if written_len != len {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "parameter file {slot} holds {written_len} values for step {step}, the task \
                     says {len}"
                ),
            ));
        }
        Ok(Some(ParamsLease {
            lease,
            len: len as usize,
        }))
    }

    /// Maps `shard`'s file (written once by the coordinator, complete, and never changed again)
    /// and returns its `len` values at byte `offset`, used where they are: no copy, and pages
    /// the coordinator already filled. A region outside the file is an error.
    pub fn map_shard(&self, shard: u32, offset: u64, len: u64) -> io::Result<ShardFile> {
        let file = File::open(self.dir.join(shard_file(shard)))?;
        let bytes = len
            .checked_mul(4)
            .filter(|&bytes| offset.is_multiple_of(4) && offset.checked_add(bytes).is_some())
            .ok_or_else(|| outside(offset, len, None))?;
        let map = FrozenMap::new(&file)?;
        // Checked against the mapping itself, so `values` can never index past it.
        if offset + bytes > map.bytes().len() as u64 {
            return Err(outside(offset, len, None));
        }
        Ok(ShardFile {
            map,
            start: offset as usize,
            len: len as usize,
        })
    }

    /// Lends this worker's gradient file to `fill` as consecutive regions of `lens[i]` values
    /// (the file grown first when it is too short), so that gradients are computed where the
    /// coordinator reads them instead of being copied there; the regions' references, in order,
    /// and what `fill` returned. The regions follow every region this worker filled earlier in
    /// `step` (the coordinator reads accepted results in place until the step's update is done),
    /// and start again at byte 0 with a new step. They hold whatever an earlier step left:
    /// `fill` must write every value it reports. The file's lock is held while `fill` runs (one
    /// task at a time: the worker awaits each to the end), so `fill` must not call this again.
    pub fn fill_gradients<R>(
        &self,
        step: u64,
        lens: &[usize],
        fill: impl FnOnce(Vec<&mut [f32]>) -> R,
    ) -> io::Result<(Vec<TensorRef>, R)> {
        let total: u64 = lens.iter().map(|&len| 4 * len as u64).sum();
        let mut file = lock(&self.gradients);
        // Only a later step starts again (a task of an earlier one, which cannot come after a
        // later one's, would write after the regions too).
        if step > file.step {
            file.step = step;
            file.next = 0;
        }
        let start = file.next;
        let mut refs = Vec::with_capacity(lens.len());
        let mut offset = start;
        for &len in lens {
            refs.push(TensorRef::Shared {
                offset,
                len: len as u64,
            });
            offset += 4 * len as u64;
        }
        if total == 0 {
            let empty = lens.iter().map(|_| &mut [][..]).collect();
            return Ok((refs, fill(empty)));
        }
        // Taken before `fill` runs: a region it fails to fill is not reused within the step.
        file.next = start + total;
        let mut rest: &mut [f32] = bytemuck::cast_slice_mut(file.map.region(start, total)?);
        let mut regions = Vec::with_capacity(lens.len());
        for &len in lens {
            let (region, after) = std::mem::take(&mut rest).split_at_mut(len);
            regions.push(region);
            rest = after;
        }
        Ok((refs, fill(regions)))
    }

    /// Writes `value` over the `len` values at byte `offset` of this worker's gradient file,
    /// against the protocol when the coordinator may still read them: a worker misbehaving on
    /// purpose, so that tests can check the coordinator's second check (the worker's
    /// `--inject-fault rewrite@STEP`). One value in every 256 goes first, so that every part of the
    /// region has changed within microseconds; then the rest.
    #[doc(hidden)]
    pub fn overwrite_gradients(&self, offset: u64, len: u64, value: f32) -> io::Result<()> {
        let bytes = len
            .checked_mul(4)
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        let mut file = lock(&self.gradients);
        let region: &mut [f32] = bytemuck::try_cast_slice_mut(file.map.region(offset, bytes)?)
            .map_err(|e| io::Error::other(format!("gradient values are not aligned: {e}")))?;
        region.iter_mut().step_by(256).for_each(|v| *v = value);
        region.fill(value);
        Ok(())
    }
}

/// A shard's values in its mapped file.
#[derive(Debug)]
pub struct ShardFile {
    map: FrozenMap,
    /// Byte offset of the first value.
    start: usize,
    /// Values.
    len: usize,
}

impl ShardFile {
    pub fn values(&self) -> &[f32] {
        let bytes = &self.map.bytes()[self.start..self.start + 4 * self.len];
        // The mapping is page-aligned and `start` a multiple of 4 (checked when mapped).
        bytemuck::cast_slice(bytes)
    }
}

fn param_file(slot: u32) -> String {
    format!("params-{slot}.f32")
}

/// Takes a parameter file (opened, and created, on first use unless prepared) and has `fill`
/// (taken from its option) write its values: `Ok(Some(whether fill wrote them))`, or `Ok(None)`
/// (fill not called) when a worker holds the file. The header names `step` only once the values
/// are written: until then, and for good if `fill` declines, it names no step ([`NO_STEP`]), so
/// no task leases half-written values.
fn write_param_file(
    file: &mut Option<WriteMap>,
    path: &Path,
    step: u64,
    len: usize,
    fill: &mut Option<impl FnOnce(Option<&mut [f32]>) -> bool>,
) -> io::Result<Option<bool>> {
    let map = match file {
        Some(map) => map,
        empty => empty.insert(WriteMap::new(private_file(path, true)?)),
    };
    let Some(mut locked) = map.try_lock()? else {
        return Ok(None);
    };
    let len = len as u64;
    let region = locked.region(0, PARAM_HEADER + 4 * len)?;
    let (header, rest) = region.split_at_mut(PARAM_HEADER as usize);
    header[..8].copy_from_slice(&NO_STEP.to_le_bytes());
    header[8..16].copy_from_slice(&len.to_le_bytes());
    // The mapping starts on a page and the header is `PARAM_HEADER` (64) bytes, so the values
    // are aligned.
    let values = bytemuck::try_cast_slice_mut(rest)
        .map_err(|e| io::Error::other(format!("parameter values are not aligned: {e}")))?;
    let filled = (fill.take().expect("a file is filled once"))(Some(values));
    if filled {
        header[..8].copy_from_slice(&step.to_le_bytes());
    }
    Ok(Some(filled))
}

/// The step a parameter file's header names while its values are being written: no task's.
const NO_STEP: u64 = u64::MAX;

/// A parameter file's header: the step its values are for, and their number.
fn read_param_header(bytes: &[u8]) -> (u64, u64) {
    let word = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
    (word(0), word(8))
}

fn shard_file(shard: u32) -> String {
    format!("shard-{shard}.f32")
}

fn gradient_file(worker: u64) -> String {
    format!("grad-{worker:016x}.f32")
}

fn mailbox_file(worker: u64) -> String {
    format!("mail-{worker:016x}")
}

/// Opens (creating, mode 0600) a file for reading and writing; `truncate` empties it.
fn private_file(path: &Path, truncate: bool) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(truncate)
        .mode(0o600)
        .open(path)
}

/// `len` f32 values at byte `offset` of a mapped file, left where they are.
fn map_region(map: &mut ReadMap, offset: u64, len: u64) -> io::Result<MappedValues> {
    // A region outside the file is an error here, before anything is allocated for it: a
    // peer's `len` could otherwise ask for terabytes.
    if !offset.is_multiple_of(4) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("region at byte {offset} is not aligned to its 4-byte values"),
        ));
    }
    let values = usize::try_from(len)
        .ok()
        .filter(|_| len.checked_mul(4).is_some())
        .ok_or_else(|| outside(offset, len, None))?;
    map.values(offset, values)
        .map_err(|e| outside(offset, len, Some(e)))
}

fn outside(offset: u64, len: u64, cause: Option<io::Error>) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!(
            "region of {len} values at byte {offset} is outside the file{}",
            cause.map_or(String::new(), |c| format!(" ({c})"))
        ),
    )
}

/// Files mapped into memory: the workspace's only `unsafe` access to memory other processes
/// share (the other `unsafe` is calling `#[target_feature]` kernels on CPUs that have the
/// features, `common/src/kernels/vector_isa.rs`, and the vector loads and stores of the AVX-512
/// weight-gradient tile, `common/src/kernels/tree_tile_avx512.rs`).
///
/// A file grows by writing zeros through the file API before it is mapped, so a full `/dev/shm`
/// is an `ENOSPC` error here (and the caller falls back to inline tensors) instead of a SIGBUS
/// on the first store into a page tmpfs cannot back.
///
/// Invariants that make the mappings sound in this process:
/// - A mapping is replaced (never resized in place) when the file grows; every access is
///   bounds-checked against the mapping's length. A read mapping may outlive its `ReadMap` (the
///   [`MappedValues`] made from it share it, across a remap and after `SharedDir::forget`): a
///   mapping keeps the file's pages itself, whether or not the file is still open or named.
/// - A mapped file is never shrunk: files only grow (zeros written past the end), so no access
///   within a mapping can touch pages past the end of the file (which would raise SIGBUS). The
///   directory is private (0700) and its files 0600, so only processes of the same user, which
///   could equally kill the coordinator, could truncate them.
/// - A read mapping's bytes are only measured, copied out and added, within this module's passes
///   ([`MappedValues::measure`], and `SharedValues::copy_measuring` and `add_measuring`, the loops
///   of `common::kernels`' measuring copy and addition, which read each value once), never lent out
///   as references beyond them, so a concurrent writer in another process can change what a pass
///   reads (a result the protocol then rejects, or values the update's checked read then zeroes)
///   but not break this process's aliasing rules.
/// - A frozen mapping is of a file that is complete before any process can open it (written
///   under a temporary name, then renamed) and never written again (a shard file): its bytes may
///   be lent out as `&[u8]`, borrowed from the `FrozenMap`, as nothing changes them. Unlike a
///   read mapping, this trusts the writer (the coordinator, which the worker already trusts with
///   its parameters and data) to keep the file as it is; a process of the same user that rewrote
///   or truncated it anyway is, as below, outside what the 0700 directory defends against.
/// - A locked mapping is of a parameter file, which its writer (the coordinator, trusted as for
///   shard files) rewrites only while it holds an exclusive `flock` on it, taken without waiting.
///   Its bytes may be borrowed only from a [`Lease`], which holds a shared `flock` on the file
///   for as long as it lives (the borrow cannot outlive it): while any lease exists the writer
///   cannot lock the file, so nothing changes the borrowed bytes. Leases of one mapping share
///   one lock, taken by the first and released by the last.
/// - A write mapping is of a file no other process writes: the coordinator writes the parameter
///   files (under the exclusive lock above) and maps the workers' gradient files read-only; each
///   worker writes only its own gradient file and maps the parameter files read-only. So its
///   bytes may be lent out as `&mut [u8]`, borrowed from the `WriteMap` (never outliving or
///   seeing a remap), to be written in place: other processes only read them, which changes
///   nothing this process can observe.
///   A process of the same user that wrote such a file anyway would race with this one's
///   borrow; like truncation, that is outside what the 0700 directory defends against (such a
///   process could equally kill or ptrace this one).
/// - A shared map (a worker's mailbox) is written by both processes, each in its own parts, so
///   no reference to its bytes is ever made: they are copied in and out through raw pointers,
///   and the words both sides synchronise on are accessed only as `AtomicU32`s (which `futex`
///   waits on). A peer that wrote this side's parts anyway can only garble what this side
///   copies out next, which is decoded and checked like any message from that peer.
#[allow(unsafe_code)]
mod mapping {
    use std::fs::File;
    use std::io;
    use std::sync::{Arc, Mutex};

    use std::sync::atomic::AtomicU32;

    use common::train::{Magnitude, SharedValues};
    use memmap2::{Mmap, MmapMut, MmapOptions, MmapRaw};
    use rayon::prelude::*;
    use rustix::fs::{FlockOperation, flock};

    /// `dst.copy_from_slice(src)`, in pieces of 256 KiB on the current rayon pool (the
    /// coordinator's global one): copies sit on the step's critical path while the other side
    /// waits.
    pub(super) fn copy(dst: &mut [u8], src: &[u8]) {
        const PIECE: usize = 256 << 10;
        if dst.len() < 2 * PIECE {
            dst.copy_from_slice(src);
        } else {
            dst.par_chunks_mut(PIECE)
                .zip(src.par_chunks(PIECE))
                .for_each(|(d, s)| d.copy_from_slice(s));
        }
    }

    /// A file this process reads through a read-only mapping, remapped when it has grown. The
    /// mapping is shared with the [`MappedValues`] made from it, which keep it mapped after a
    /// remap or after the reader lets the file go.
    #[derive(Debug)]
    pub struct ReadMap {
        file: File,
        map: Option<Arc<Mmap>>,
    }

    impl ReadMap {
        pub fn new(file: File) -> Self {
            ReadMap { file, map: None }
        }

        /// Maps the file far enough that `len` bytes at `offset` are inside it;
        /// `UnexpectedEof` when the file is shorter (checked before any caller allocates).
        pub fn ensure(&mut self, offset: u64, len: u64) -> io::Result<()> {
            let end = offset
                .checked_add(len)
                .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
            if self.map.as_ref().is_none_or(|m| (m.len() as u64) < end) {
                let size = self.file.metadata()?.len();
                if size < end {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("the file has {size} bytes"),
                    ));
                }
                // SAFETY: see the module's invariants (never shrunk, copies only).
                let map = unsafe { MmapOptions::new().len(size as usize).map(&self.file)? };
                self.map = Some(Arc::new(map));
            }
            Ok(())
        }

        /// The `len` f32 values at byte `offset` (a multiple of 4, checked by callers), kept
        /// mapped while they live; `UnexpectedEof` when the file is shorter.
        pub fn values(&mut self, offset: u64, len: usize) -> io::Result<MappedValues> {
            let bytes = (len as u64)
                .checked_mul(4)
                .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
            self.ensure(offset, bytes)?;
            Ok(MappedValues {
                map: Arc::clone(self.map.as_ref().expect("mapped above")),
                start: offset as usize,
                len,
            })
        }
    }

    /// Values per piece of a parallel pass over mapped values.
    const PIECE: usize = 64 << 10;

    /// f32 values in a read mapping, which they keep mapped (after a remap of the file, or after
    /// its reader lets it go). Another process may write them at any moment, so they are never
    /// lent out: only measured, copied out or added into a sum, each value read once per pass.
    #[derive(Debug)]
    pub struct MappedValues {
        map: Arc<Mmap>,
        /// Byte offset of the first value: a multiple of 4, inside the mapping with all `len`.
        start: usize,
        len: usize,
    }

    impl MappedValues {
        /// Values `from..from + len`, borrowed only within this module's passes.
        fn slice(&self, from: usize, len: usize) -> &[f32] {
            assert!(
                from <= self.len && len <= self.len - from,
                "values {from}..{} of {}",
                from + len,
                self.len
            );
            let start = self.start + 4 * from;
            // The mapping starts on a page and `start` is a multiple of 4.
            bytemuck::cast_slice(&self.map[start..start + 4 * len])
        }

        /// The values' largest magnitude, measured without copying them, in pieces on the
        /// current rayon pool (a result is measured on arrival, on the step's critical path).
        pub fn measure(&self) -> Magnitude {
            self.slice(0, self.len)
                .par_chunks(PIECE)
                .map(Magnitude::of)
                .reduce(Magnitude::default, Magnitude::max)
        }

        /// Every value copied into `out` (resized; its allocation is reused), measured as it is
        /// copied, in pieces on the current rayon pool.
        pub fn copy_out(&self, out: &mut Vec<f32>) -> Magnitude {
            out.resize(self.len, 0.0);
            out.par_chunks_mut(PIECE)
                .zip(self.slice(0, self.len).par_chunks(PIECE))
                .map(|(out, src)| Magnitude::copy_measuring(out, src))
                .reduce(Magnitude::default, Magnitude::max)
        }
    }

    impl SharedValues for MappedValues {
        fn len(&self) -> usize {
            self.len
        }

        fn copy_measuring(&self, start: usize, out: &mut [f32]) -> Magnitude {
            Magnitude::copy_measuring(out, self.slice(start, out.len()))
        }

        fn add_measuring(&self, start: usize, acc: &mut [f32]) -> Magnitude {
            Magnitude::add_measuring(acc, self.slice(start, acc.len()))
        }
    }

    /// Grows `file` from `from` to `to` bytes by writing zeros, so its pages exist before any
    /// store through a mapping reaches them.
    fn reserve(file: &File, from: u64, to: u64) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        const BLOCK: usize = 1 << 20;
        let zeros = vec![0u8; BLOCK];
        let mut at = from;
        while at < to {
            let n = (to - at).min(BLOCK as u64) as usize;
            file.write_all_at(&zeros[..n], at)?;
            at += n as u64;
        }
        Ok(())
    }

    /// A whole file no process writes any more, mapped read-only; its bytes may be borrowed.
    #[derive(Debug)]
    pub struct FrozenMap {
        map: Mmap,
    }

    impl FrozenMap {
        pub fn new(file: &File) -> io::Result<Self> {
            // SAFETY: see the module's invariants (the file is complete and never written or
            // shrunk again; the mapping keeps the file itself alive after `file` is closed).
            let map = unsafe { Mmap::map(file)? };
            Ok(FrozenMap { map })
        }

        pub fn bytes(&self) -> &[u8] {
            &self.map
        }
    }

    /// A file this process writes through a shared writable mapping, grown (and remapped) on
    /// demand.
    #[derive(Debug)]
    pub struct WriteMap {
        file: File,
        map: Option<MmapMut>,
    }

    impl WriteMap {
        pub fn new(file: File) -> Self {
            WriteMap { file, map: None }
        }

        /// The file locked exclusively (`flock`), if no other process holds a lock on it now;
        /// the lock goes with the guard.
        pub fn try_lock(&mut self) -> io::Result<Option<Locked<'_>>> {
            match flock(&self.file, FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => Ok(Some(Locked { map: self })),
                Err(rustix::io::Errno::WOULDBLOCK) => Ok(None),
                Err(e) => Err(e.into()),
            }
        }

        /// The `len` bytes at `offset`, to write in place, the file grown first if it is too
        /// short. Borrowed from the map: it cannot outlive the mapping or see it replaced.
        pub fn region(&mut self, offset: u64, len: u64) -> io::Result<&mut [u8]> {
            let end = offset
                .checked_add(len)
                .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
            if self.map.as_ref().is_none_or(|m| (m.len() as u64) < end) {
                let current = self.file.metadata()?.len();
                let size = current.max(end);
                reserve(&self.file, current, size)?;
                // SAFETY: see the module's invariants (file kept open, never shrunk, written by
                // this process only).
                self.map =
                    Some(unsafe { MmapOptions::new().len(size as usize).map_mut(&self.file)? });
            }
            let map = self.map.as_mut().expect("mapped above");
            Ok(&mut map[offset as usize..end as usize])
        }
    }

    /// A fixed-size file both processes map writable, each writing only its own parts (a
    /// worker's mailbox, `crate::mailbox`). Its bytes are never lent out: the other side's parts
    /// are only copied out (and decoded from the copy), this side's only copied in, and the words
    /// both sides synchronise on are only touched as atomics. Every access is bounds-checked.
    #[derive(Debug)]
    pub struct SharedMap {
        map: MmapRaw,
        /// Kept open with the mapping, as every mapping here.
        _file: File,
    }

    impl SharedMap {
        /// Grows the (new, empty) `file` to `len` bytes of zeros and maps it.
        pub fn create(file: File, len: u64) -> io::Result<Self> {
            reserve(&file, 0, len)?;
            Self::open(file)
        }

        /// Maps all of `file` as it is now.
        pub fn open(file: File) -> io::Result<Self> {
            // Mapping is safe here (a raw mapping makes no reference); each access below is
            // `unsafe`, under the module's invariants.
            let map = MmapOptions::new().map_raw(&file)?;
            Ok(SharedMap { map, _file: file })
        }

        pub fn len(&self) -> usize {
            self.map.len()
        }

        fn check(&self, offset: usize, len: usize) {
            assert!(
                offset
                    .checked_add(len)
                    .is_some_and(|end| end <= self.map.len()),
                "{len} bytes at {offset} are outside a mapping of {}",
                self.map.len()
            );
        }

        /// The 4-byte word at `offset` (a multiple of 4), shared with the other process.
        pub fn word(&self, offset: usize) -> &AtomicU32 {
            self.check(offset, 4);
            assert!(offset.is_multiple_of(4), "word at {offset} is not aligned");
            // SAFETY: inside the mapping (checked), aligned (the mapping starts on a page),
            // and only ever accessed as an atomic by either process; borrowed from `self`, so
            // it cannot outlive the mapping.
            unsafe { &*self.map.as_ptr().add(offset).cast::<AtomicU32>() }
        }

        /// Copies `out.len()` bytes at `offset` out of the mapping.
        pub fn read(&self, offset: usize, out: &mut [u8]) {
            self.check(offset, out.len());
            // SAFETY: inside the mapping (checked); `out` is this process's own memory.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    self.map.as_ptr().add(offset),
                    out.as_mut_ptr(),
                    out.len(),
                );
            }
        }

        /// Copies `src` into the mapping at `offset`.
        pub fn write(&self, offset: usize, src: &[u8]) {
            self.check(offset, src.len());
            // SAFETY: inside the mapping (checked); no reference into it exists.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    src.as_ptr(),
                    self.map.as_mut_ptr().add(offset),
                    src.len(),
                );
            }
        }
    }

    /// A [`WriteMap`] whose file this process holds an exclusive lock on (see [`LockedMap`]).
    pub struct Locked<'a> {
        map: &'a mut WriteMap,
    }

    impl Locked<'_> {
        pub fn region(&mut self, offset: u64, len: u64) -> io::Result<&mut [u8]> {
            self.map.region(offset, len)
        }
    }

    impl Drop for Locked<'_> {
        fn drop(&mut self) {
            // Closing the file would release the lock too; unlocking cannot fail on a valid fd.
            let _ = flock(&self.map.file, FlockOperation::Unlock);
        }
    }

    /// A whole file another process rewrites under an exclusive `flock`, mapped read-only; its
    /// bytes are lent only through a [`Lease`].
    pub struct LockedMap {
        file: File,
        map: Mmap,
        /// Leases alive: the shared lock is taken at the first and released after the last.
        leases: Mutex<usize>,
    }

    impl std::fmt::Debug for LockedMap {
        // Not the bytes: they may be read only under a lease.
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("LockedMap")
                .field("len", &self.map.len())
                .finish()
        }
    }

    impl LockedMap {
        pub fn new(file: File) -> io::Result<Self> {
            // SAFETY: see the module's invariants (file kept open, never shrunk, bytes lent only
            // under a shared lock the writer respects).
            let map = unsafe { Mmap::map(&file)? };
            Ok(LockedMap {
                file,
                map,
                leases: Mutex::new(0),
            })
        }

        /// The mapping's length (not its bytes, which need a lease).
        pub fn len(&self) -> usize {
            self.map.len()
        }

        /// Locks the file shared (waiting while the writer holds it) and lends its bytes.
        pub fn lease(self: &Arc<Self>) -> io::Result<Lease> {
            let mut leases = super::lock(&self.leases);
            if *leases == 0 {
                flock(&self.file, FlockOperation::LockShared)?;
            }
            *leases += 1;
            Ok(Lease {
                map: Arc::clone(self),
            })
        }
    }

    /// A shared lock on a [`LockedMap`]'s file, and its bytes while the lock lasts.
    #[derive(Debug)]
    pub struct Lease {
        map: Arc<LockedMap>,
    }

    impl Lease {
        pub fn bytes(&self) -> &[u8] {
            &self.map.map
        }
    }

    impl Drop for Lease {
        fn drop(&mut self) {
            let mut leases = super::lock(&self.map.leases);
            *leases -= 1;
            if *leases == 0 {
                let _ = flock(&self.map.file, FlockOperation::Unlock);
            }
        }
    }
}

/// Removes `vae-shm-<pid>-*` directories under `base` whose process no longer exists.
fn remove_stale(base: &Path) {
    let Ok(entries) = fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(DIR_PREFIX))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use common::train::{Magnitude, SharedValues};

    use super::*;

    /// Copies gradients for `step` one after another into the worker's file; their references,
    /// in order.
    fn write_gradients(client: &SharedClient, step: u64, grads: &[&[f32]]) -> Vec<TensorRef> {
        let lens: Vec<usize> = grads.iter().map(|g| g.len()).collect();
        let (refs, ()) = client
            .fill_gradients(step, &lens, |regions| {
                for (region, grad) in regions.into_iter().zip(grads) {
                    region.copy_from_slice(grad);
                }
            })
            .unwrap();
        refs
    }

    /// What the coordinator reads for `worker`'s gradient `r`: its values copied out, and the
    /// magnitude measured where they are.
    fn read_back(dir: &SharedDir, worker: u64, r: &TensorRef) -> (Vec<f32>, Magnitude) {
        let TensorRef::Shared { offset, len } = *r else {
            panic!("a shared reference, not {r:?}")
        };
        let values = dir.map_gradient(worker, offset, len).unwrap();
        (values.to_vec().0, values.measure())
    }

    fn values(n: usize, salt: f32) -> Vec<f32> {
        (0..n).map(|i| (i as f32 * 0.37 + salt).sin()).collect()
    }

    #[test]
    fn parameters_and_gradients_cross_bit_for_bit() {
        let base = tempfile::tempdir().unwrap();
        let dir = SharedDir::create(base.path(), "t", b"secret probe").unwrap();
        assert!(dir.path().starts_with(base.path()));
        let params = values(1000, 0.5);
        let r = dir.write_params(1, &params).unwrap();
        let (client, probe) = SharedClient::open(&dir.offer(), 42).unwrap();
        assert!(dir.verify(&probe));
        assert!(!dir.verify(b"secret probX"));
        assert!(!dir.verify(b""));
        let TensorRef::ParameterFile { slot, len } = r else {
            panic!()
        };
        let lease = client.lease_params(slot, 1, len).unwrap().unwrap();
        assert_eq!(bits(lease.values()), bits(&params));
        drop(lease);

        let (a, b) = (values(300, 1.0), values(300, 2.0));
        let refs = write_gradients(&client, 1, &[&a, &b]);
        for (r, want) in refs.iter().zip([&a, &b]) {
            assert_eq!(&read_back(&dir, 42, r).0, want);
        }
        // Regions outside the file (one claiming 2^40 values, or 2^62 bytes), unaligned ones,
        // and other workers' files are errors.
        for (offset, len) in [(0, 10_000), (0, 1 << 40), (0, 1 << 62)] {
            let err = dir.map_gradient(42, offset, len).unwrap_err();
            assert!(err.to_string().contains("outside the file"), "{err}");
        }
        let err = dir.map_gradient(42, 2, 1).unwrap_err();
        assert!(err.to_string().contains("not aligned"), "{err}");
        assert!(dir.map_gradient(43, 0, 1).is_err());
        let path = dir.path().to_path_buf();
        drop(client);
        drop(dir);
        assert!(!path.exists(), "the directory goes with the coordinator");
    }

    fn bits(values: &[f32]) -> Vec<u32> {
        values.iter().map(|v| v.to_bits()).collect()
    }

    /// The parameter file and length a write went to.
    fn slot_of(r: TensorRef) -> (u32, u64) {
        match r {
            TensorRef::ParameterFile { slot, len } => (slot, len),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn parameter_files_rotate_and_grow_through_existing_mappings() {
        let base = tempfile::tempdir().unwrap();
        let dir = SharedDir::create(base.path(), "g", b"p").unwrap();
        let (client, _) = SharedClient::open(&dir.offer(), 7).unwrap();
        let mut slots = Vec::new();
        for (step, (n, salt)) in [(100, 0.0), (100, 1.0), (5000, 2.0), (10, 3.0), (7, 4.0)]
            .into_iter()
            .enumerate()
        {
            let step = step as u64;
            let params = values(n, salt);
            let (slot, len) = slot_of(dir.write_params(step, &params).unwrap());
            slots.push(slot);
            let lease = client.lease_params(slot, step, len).unwrap().unwrap();
            assert_eq!(bits(lease.values()), bits(&params), "step {step}");
            // Another step's parameters, or another length, are not these.
            assert!(client.lease_params(slot, step + 1, len).unwrap().is_none());
            let err = client.lease_params(slot, step, len - 1).unwrap_err();
            assert!(err.to_string().contains("the task says"), "{err}");
            drop(lease);
            let grads = [values(n, salt + 0.5), values(n, salt + 0.7)];
            let refs = write_gradients(&client, step, &[&grads[0], &grads[1]]);
            for (r, want) in refs.iter().zip(&grads) {
                assert_eq!(&read_back(&dir, 7, r).0, want);
            }
        }
        // With no worker holding one, the files are used in turn.
        assert_eq!(slots, [0, 1, 2, 3, 0]);
        assert!(client.lease_params(PARAM_SLOTS, 0, 1).is_err());
        // A region past the end of the file is an error, not a short read.
        let err = client.lease_params(3, 3, 1 << 40).unwrap_err();
        assert!(err.to_string().contains("outside the file"), "{err}");
        // A file not yet mapped whose directory is gone (the coordinator ended): `NotFound`,
        // which a worker takes for a void task rather than a broken peer.
        let (client, _) = SharedClient::open(&dir.offer(), 8).unwrap();
        drop(dir);
        let err = client.lease_params(1, 1, 100).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound, "{err}");
    }

    /// A second mailbox for a worker closes the first in its own file and never truncates it
    /// (its server and the worker may still map it).
    #[test]
    fn a_mailbox_made_again_closes_the_old_one_in_its_own_file() {
        let base = tempfile::tempdir().unwrap();
        let dir = SharedDir::create(base.path(), "m", b"p").unwrap();
        let (client, _) = SharedClient::open(&dir.offer(), 7).unwrap();
        let first = dir.create_mailbox(7, 4096).unwrap();
        let worker_first = client.open_mailbox().unwrap();
        let second = dir.create_mailbox(7, 4096).unwrap();
        assert!(first.is_closed() && worker_first.is_closed());
        assert!(!second.is_closed());
        let worker_second = client.open_mailbox().unwrap();
        assert!(!worker_second.is_closed());
        // The old mapping is still whole: a call through it is refused as closed, not a SIGBUS.
        worker_first.post(1, b"late").unwrap();
        let waited = worker_first
            .wait_reply(1, std::time::Duration::from_secs(1), &mut Vec::new())
            .unwrap();
        assert_eq!(waited, crate::mailbox::Waited::Closed);
        dir.forget(7);
        assert!(second.is_closed());
        assert!(!dir.path().join(mailbox_file(7)).exists());
    }

    #[test]
    fn prepared_parameter_files_are_full_length_and_name_no_step() {
        let base = tempfile::tempdir().unwrap();
        let dir = SharedDir::create(base.path(), "w", b"p").unwrap();
        dir.prepare_params(1000).unwrap();
        let (client, _) = SharedClient::open(&dir.offer(), 7).unwrap();
        for slot in 0..PARAM_SLOTS {
            let file = dir.path().join(param_file(slot));
            assert!(fs::metadata(&file).unwrap().len() >= PARAM_HEADER + 4000);
            // No task can take the zeros for a step's parameters.
            assert!(client.lease_params(slot, 0, 1000).unwrap().is_none());
        }
        // Steps then use the files in turn from the first, as without the preparation.
        for step in 0..PARAM_SLOTS as u64 + 1 {
            let params = values(1000, step as f32);
            let (slot, len) = slot_of(dir.write_params(step, &params).unwrap());
            assert_eq!(slot, step as u32 % PARAM_SLOTS);
            let lease = client.lease_params(slot, step, len).unwrap().unwrap();
            assert_eq!(bits(lease.values()), bits(&params), "step {step}");
        }
    }

    #[test]
    fn a_parameter_file_a_worker_holds_is_never_rewritten() {
        let base = tempfile::tempdir().unwrap();
        let dir = SharedDir::create(base.path(), "h", b"p").unwrap();
        let (client, _) = SharedClient::open(&dir.offer(), 7).unwrap();
        let first = values(300, 0.25);
        let (held, len) = slot_of(dir.write_params(10, &first).unwrap());
        let lease = client.lease_params(held, 10, len).unwrap().unwrap();
        // A straggler holds step 10's file: the next steps go around it.
        let mut others = Vec::new();
        for step in 11..11 + 2 * PARAM_SLOTS as u64 {
            let (slot, _) = slot_of(dir.write_params(step, &values(300, step as f32)).unwrap());
            assert_ne!(slot, held, "step {step}");
            others.push(slot);
        }
        assert_eq!(bits(lease.values()), bits(&first), "held values unchanged");
        // A second lease of the same file shares the lock; the file is free after the last.
        let again = client.lease_params(held, 10, len).unwrap().unwrap();
        drop(lease);
        let (slot, _) = slot_of(dir.write_params(100, &values(300, 9.0)).unwrap());
        assert_ne!(slot, held, "still held by the second lease");
        drop(again);
        // Workers holding every file: the coordinator is told to send parameters inline.
        let leases: Vec<ParamsLease> = (0..PARAM_SLOTS)
            .map(|slot| {
                let (s, len) = slot_of(dir.write_params(200 + slot as u64, &first).unwrap());
                client
                    .lease_params(s, 200 + slot as u64, len)
                    .unwrap()
                    .unwrap()
            })
            .collect();
        let err = dir.write_params(300, &first).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock, "{err}");
        drop(leases);
        let (slot, len) = slot_of(dir.write_params(300, &first).unwrap());
        let lease = client.lease_params(slot, 300, len).unwrap().unwrap();
        assert_eq!(bits(lease.values()), bits(&first));
    }

    #[test]
    fn parameters_filled_in_place_are_leased_only_once_filled() {
        let base = tempfile::tempdir().unwrap();
        let dir = SharedDir::create(base.path(), "f", b"p").unwrap();
        let (client, _) = SharedClient::open(&dir.offer(), 7).unwrap();
        let want = values(500, 0.75);
        let r = dir
            .write_params_with(5, want.len(), |file| {
                file.expect("a free file").copy_from_slice(&want);
                true
            })
            .unwrap()
            .expect("filled");
        let (slot, len) = slot_of(r);
        let lease = client.lease_params(slot, 5, len).unwrap().unwrap();
        assert_eq!(bits(lease.values()), bits(&want));
        drop(lease);
        // A fill that declines (a failed update) leaves a file that names no step: a task of
        // this step or of the one the file held before leases nothing.
        let declined = dir
            .write_params_with(6, want.len(), |file| {
                file.expect("a free file")[..10].fill(f32::NAN);
                false
            })
            .unwrap();
        assert!(declined.is_none());
        for (slot, step) in (0..PARAM_SLOTS).flat_map(|s| [(s, 5), (s, 6)]) {
            if let Ok(Some(lease)) = client.lease_params(slot, step, len) {
                assert!(slot == 0 && step == 5, "slot {slot} leased for step {step}");
                assert_eq!(bits(lease.values()), bits(&want));
            }
        }
        // Workers holding every file: the fill runs without one, then the error says why.
        let leases: Vec<ParamsLease> = (0..PARAM_SLOTS)
            .map(|_| {
                let (s, len) = slot_of(dir.write_params(9, &want).unwrap());
                client.lease_params(s, 9, len).unwrap().unwrap()
            })
            .collect();
        let mut called = None;
        let err = dir
            .write_params_with(10, want.len(), |file| {
                called = Some(file.is_some());
                true
            })
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock, "{err}");
        assert_eq!(called, Some(false), "called once, without a file");
        drop(leases);
    }

    #[test]
    fn gradients_filled_in_place_are_read_back_bit_for_bit() {
        let base = tempfile::tempdir().unwrap();
        let dir = SharedDir::create(base.path(), "f", b"p").unwrap();
        let (client, _) = SharedClient::open(&dir.offer(), 9).unwrap();
        // The file grows, then smaller steps reuse its start; no nodes lends nothing.
        for (step, (lens, salt)) in [(vec![700, 300], 1.0), (vec![50, 0, 20], 2.0), (vec![], 3.0)]
            .into_iter()
            .enumerate()
        {
            let (refs, wrote) = client
                .fill_gradients(step as u64, &lens, |regions| {
                    let lens: Vec<usize> = regions.iter().map(|r| r.len()).collect();
                    for (i, region) in regions.into_iter().enumerate() {
                        region.copy_from_slice(&values(region.len(), salt + i as f32));
                    }
                    lens
                })
                .unwrap();
            assert_eq!(wrote, lens, "each region has the length asked for");
            assert_eq!(refs.len(), lens.len());
            let mut end = 0;
            for (i, r) in refs.iter().enumerate() {
                let (got, magnitude) = read_back(&dir, 9, r);
                assert_eq!(
                    got,
                    values(lens[i], salt + i as f32),
                    "{lens:?}, region {i}"
                );
                assert_eq!(magnitude, Magnitude::of(&got), "{lens:?}, region {i}");
                let TensorRef::Shared { offset, len } = *r else {
                    panic!()
                };
                assert_eq!(offset, end, "a new step's regions start at byte 0, in turn");
                end += 4 * len;
            }
        }
    }

    /// The coordinator reads accepted gradients where they are until the step's update is done:
    /// a worker's later task in the same step writes after them, never over them; the values
    /// stay mapped when the file grows (and is mapped again) and after the worker is forgotten
    /// (its file removed).
    #[test]
    fn gradients_read_in_place_outlive_later_tasks_a_remap_and_the_worker() {
        let base = tempfile::tempdir().unwrap();
        let dir = SharedDir::create(base.path(), "i", b"p").unwrap();
        let (client, _) = SharedClient::open(&dir.offer(), 9).unwrap();
        let first = values(1000, 1.0);
        let r = write_gradients(&client, 5, &[&first])[0].clone();
        let TensorRef::Shared { offset, len } = r else {
            panic!()
        };
        let kept = dir.map_gradient(9, offset, len).unwrap();
        assert_eq!(kept.measure(), Magnitude::of(&first));
        // The same step again, longer (the file grows and the coordinator maps it again).
        let second = values(300_000, 2.0);
        let r2 = write_gradients(&client, 5, &[&second])[0].clone();
        assert_eq!(read_back(&dir, 9, &r2).0, second);
        assert!(
            matches!(r2, TensorRef::Shared { offset: 4000, .. }),
            "{r2:?}"
        );
        assert_eq!(kept.to_vec().0, first, "not overwritten, still mapped");
        // A block copied out, measured as it is copied.
        let mut block = vec![0.0; 10];
        let m = kept.copy_measuring(990, &mut block);
        assert_eq!(block, first[990..]);
        assert_eq!(m, Magnitude::of(&first[990..]));
        // And added into a sum, measured as it is added.
        let mut sum = vec![1.5; 10];
        let m = kept.add_measuring(990, &mut sum);
        let want: Vec<f32> = first[990..].iter().map(|v| 1.5 + v).collect();
        assert_eq!(sum, want);
        assert_eq!(m, Magnitude::of(&first[990..]));
        // Copied out whole, as under `--verify`.
        let mut copy = Vec::new();
        assert_eq!(kept.copy_out(&mut copy), Magnitude::of(&first));
        assert_eq!(copy, first);
        // A task of an earlier step (stale) writes after the regions too; the next step starts
        // over at byte 0.
        let r3 = write_gradients(&client, 4, &[&values(10, 3.0)])[0].clone();
        assert!(
            matches!(
                r3,
                TensorRef::Shared {
                    offset: 1_204_000,
                    ..
                }
            ),
            "{r3:?}"
        );
        let r4 = write_gradients(&client, 6, &[&values(10, 4.0)])[0].clone();
        assert!(matches!(r4, TensorRef::Shared { offset: 0, .. }), "{r4:?}");
        assert_eq!(
            kept.to_vec().0[10..],
            first[10..],
            "what the next step left alone"
        );
        // The worker gone (its mapping too), the file removed: still mapped here.
        drop(client);
        dir.forget(9);
        assert_eq!(
            kept.to_vec().0[10..],
            first[10..],
            "mapped after the file is gone"
        );
    }

    /// The magnitude measured where a gradient is, on arrival, is that of every value, across
    /// the parallel pieces of a long one: an outlier in the last, partial piece is seen.
    #[test]
    fn a_gradient_measured_in_place_is_measured_to_its_last_value() {
        let base = tempfile::tempdir().unwrap();
        let dir = SharedDir::create(base.path(), "m", b"p").unwrap();
        let (client, _) = SharedClient::open(&dir.offer(), 9).unwrap();
        let n = 2 * 65536 + 5;
        let outliers = [(n - 1, -1e30f32), (n - 3, f32::NAN), (65536, f32::INFINITY)];
        for (step, (at, outlier)) in outliers.into_iter().enumerate() {
            let (refs, ()) = client
                .fill_gradients(step as u64, &[n], |mut regions| {
                    regions[0].copy_from_slice(&values(n, 1.0));
                    regions[0][at] = outlier;
                })
                .unwrap();
            let (got, magnitude) = read_back(&dir, 9, &refs[0]);
            assert_eq!(got[at].to_bits(), outlier.to_bits(), "at {at}");
            assert_eq!(magnitude, Magnitude::of(&got), "at {at}, {outlier}");
            assert!(
                !magnitude.is_within(1e29),
                "at {at}, {outlier}: outlier missed"
            );
        }
    }

    #[test]
    fn a_shard_file_is_written_once_and_read_back_bit_for_bit() {
        let base = tempfile::tempdir().unwrap();
        let dir = SharedDir::create(base.path(), "s", b"p").unwrap();
        let (client, _) = SharedClient::open(&dir.offer(), 9).unwrap();
        assert!(
            client.map_shard(3, 0, 1).is_err(),
            "no file before it is written"
        );
        let values: Vec<f32> = (0..1000).map(|i| i as f32 * 0.37 - 5.0).collect();
        dir.write_shard(3, &values).unwrap();
        let mapped = client.map_shard(3, 0, 1000).unwrap();
        // Written once: a later request leaves the file (and what is mapped) as it is.
        dir.write_shard(3, &[0.0; 1000]).unwrap();
        assert_eq!(
            mapped
                .values()
                .iter()
                .map(|v| v.to_bits())
                .collect::<Vec<_>>(),
            values.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
        assert_eq!(
            client.map_shard(3, 400, 10).unwrap().values(),
            &values[100..110]
        );
        // A region past the end, unaligned or overflowing is an error, never a short read.
        for (offset, len) in [(0, 1001), (4000, 1), (2, 1), (4, u64::MAX / 2)] {
            let err = client.map_shard(3, offset, len).unwrap_err();
            assert!(err.to_string().contains("outside the file"), "{err}");
        }
        // No partial file is left behind, and the shard files go with the directory.
        let names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| !n.ends_with(".partial")), "{names:?}");
        let path = dir.path().to_owned();
        drop(dir);
        assert!(!path.exists());
        // A mapping outlives the file's name.
        assert_eq!(mapped.values()[999], values[999]);
    }

    #[test]
    fn after_a_shard_file_fails_every_later_shard_is_refused() {
        let base = tempfile::tempdir().unwrap();
        let dir = SharedDir::create(base.path(), "r", b"p").unwrap();
        dir.write_shard(0, &[1.0; 16]).unwrap();
        // The directory vanishes (a full or broken /dev/shm behaves alike: writes fail).
        fs::remove_dir_all(dir.path()).unwrap();
        assert!(dir.write_shard(1, &[1.0; 16]).is_err());
        fs::DirBuilder::new().create(dir.path()).unwrap();
        let err = dir.write_shard(2, &[1.0; 16]).unwrap_err();
        assert!(err.to_string().contains("writing shard 1 failed"), "{err}");
        assert!(dir.has_shard(0) && !dir.has_shard(1) && !dir.has_shard(2));
        // More than half of the free space is refused outright.
        let dir = SharedDir::create(base.path(), "b", b"p").unwrap();
        let free = rustix::fs::statvfs(dir.path()).unwrap();
        let half = free.f_bavail.saturating_mul(free.f_frsize) / 2;
        if half / 4 < (1 << 30) {
            let huge = vec![0.0f32; (half / 4 + 1) as usize];
            let err = dir.write_shard(0, &huge).unwrap_err();
            assert!(err.to_string().contains("half of the free space"), "{err}");
        }
    }

    #[test]
    fn a_directory_that_is_not_visible_fails_to_open() {
        let offer = SharedMemoryOffer {
            dir: "/nonexistent/vae-shm-1-x".into(),
            probe_file: "probe".into(),
        };
        assert!(SharedClient::open(&offer, 1).is_err());
    }

    #[test]
    fn directories_of_dead_runs_are_removed() {
        let base = tempfile::tempdir().unwrap();
        // No process has pid u32::MAX - 1.
        let dead = base
            .path()
            .join(format!("{DIR_PREFIX}{}-old", u32::MAX - 1));
        fs::create_dir(&dead).unwrap();
        let alive = base
            .path()
            .join(format!("{DIR_PREFIX}{}-other", std::process::id()));
        fs::create_dir(&alive).unwrap();
        let _dir = SharedDir::create(base.path(), "new", b"p").unwrap();
        assert!(!dead.exists());
        assert!(alive.exists());
    }
}

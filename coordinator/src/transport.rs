//! How tensors reach each worker and come back: inline in the gRPC messages, or through the
//! shared-memory directory for workers on this host that proved they see it
//! (`proto::shared_memory`). Which path a worker uses never changes a bit of the result.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use common::train::Magnitude;
use proto::mailbox::Mailbox;
use proto::messages::{Attach, SharedMemoryOffer, TensorRef};
use proto::shared_memory::SharedDir;
use proto::tensor_pool::{POOL_KEEPS, TensorPool};

use crate::error::{Error, Result};
use crate::state::ArrivedGradient;

/// The parameters of one step, in each form a worker may need them.
#[derive(Debug, Default)]
struct Published {
    step: Option<u64>,
    /// Written by the update when no worker is attached, else encoded on first use by an inline
    /// worker; shared by every inline task of the step.
    inline: Option<Bytes>,
    /// Written by the update thread when any worker is attached.
    shared: Option<TensorRef>,
}

/// The coordinator's end of the data plane.
#[derive(Debug)]
pub struct Transport {
    shared_dir: Option<SharedDir>,
    attached: Mutex<HashSet<u64>>,
    published: Mutex<Published>,
    /// Buffers that received gradients are read into, given back once summed.
    gradient_buffers: TensorPool,
    /// Buffers the update writes inline parameters into, lent to the tasks' replies.
    inline_buffers: TensorPool,
    /// Set at the first shard that could not be written (warned about once).
    shard_files_refused: AtomicBool,
    /// Set at the first step whose parameters could not be written (warned about once).
    params_inline_warned: AtomicBool,
    /// Whether a co-located worker's gradient is copied out on arrival instead of read where it
    /// is (`--verify`: a rewrite after arrival could otherwise escape the verification of the
    /// copy compared).
    copy_gradients: bool,
}

impl Transport {
    /// `shared_dir`: `None` disables shared memory (`--transport tcp`, or no usable directory).
    pub fn new(shared_dir: Option<SharedDir>) -> Self {
        Transport {
            shared_dir,
            attached: Mutex::new(HashSet::new()),
            published: Mutex::new(Published::default()),
            gradient_buffers: TensorPool::default(),
            inline_buffers: TensorPool::default(),
            shard_files_refused: AtomicBool::new(false),
            params_inline_warned: AtomicBool::new(false),
            copy_gradients: false,
        }
    }

    /// With `copy`, co-located workers' gradients are copied out on arrival (`--verify`).
    pub fn copying_gradients(self, copy: bool) -> Self {
        Transport {
            copy_gradients: copy,
            ..self
        }
    }

    /// A buffer to read a gradient into (a recycled one when there is one).
    pub fn gradient_buffer(&self) -> Vec<f32> {
        self.gradient_buffers.take()
    }

    /// Gives gradient buffers back once their values were summed.
    pub fn recycle(&self, spent: impl IntoIterator<Item = Vec<f32>>) {
        for buffer in spent {
            self.gradient_buffers.give_back(buffer);
        }
    }

    /// What registration offers a worker.
    pub fn offer(&self) -> Option<SharedMemoryOffer> {
        self.shared_dir.as_ref().map(SharedDir::offer)
    }

    /// A registered worker read the probe back: attached if it matches.
    pub fn attach(&self, worker: u64, request: &Attach) -> bool {
        let ok = self
            .shared_dir
            .as_ref()
            .is_some_and(|dir| dir.verify(&request.probe));
        if ok {
            lock(&self.attached).insert(worker);
        }
        ok
    }

    /// An attached worker's mailbox, for replies of up to `reply_capacity` bytes; `None` when
    /// it cannot be made (a full `/dev/shm`: the worker then calls the service as before).
    pub fn create_mailbox(&self, worker: u64, reply_capacity: u32) -> Option<Arc<Mailbox>> {
        let dir = self.shared_dir.as_ref()?;
        // Under the attachment lock, so that `forget` cannot run between the check and the
        // making (and leave a mailbox no one closes).
        let attached = lock(&self.attached);
        if !attached.contains(&worker) {
            return None;
        }
        dir.create_mailbox(worker, reply_capacity)
            .inspect_err(|e| {
                tracing::warn!("no mailbox for worker {worker:x} ({e}): its calls use gRPC")
            })
            .ok()
    }

    /// Closes every mailbox: the run is over, and their threads end.
    pub fn close_mailboxes(&self) {
        if let Some(dir) = &self.shared_dir {
            dir.close_mailboxes();
        }
    }

    pub fn is_attached(&self, worker: u64) -> bool {
        lock(&self.attached).contains(&worker)
    }

    pub fn any_attached(&self) -> bool {
        !lock(&self.attached).is_empty()
    }

    /// A worker is gone: drop its attachment and its gradient file.
    pub fn forget(&self, worker: u64) {
        if lock(&self.attached).remove(&worker)
            && let Some(dir) = &self.shared_dir
        {
            dir.forget(worker);
        }
    }

    /// Whether `worker` reads `shard` from its file in shared memory (written from `values` on
    /// first use, blocking: call it off the async runtime). `false`, so the shard is streamed
    /// instead, for a worker not attached or when the file cannot be written (a full `/dev/shm`).
    pub fn shard_in_shared_memory(&self, worker: u64, shard: u32, values: &[f32]) -> bool {
        self.is_attached(worker) && self.write_shard_file(shard, values)
    }

    /// Writes every shard's file now, before any worker asks, for a run whose workers are known
    /// to be on this host (`--local`): otherwise step 0 writes them as its tasks ask (188 MB for
    /// the default data, 83 ms on a 2-core VM, inside the step). Blocking. Stops at the first
    /// shard that cannot be written (warned once); that one and the rest are then streamed.
    pub fn write_shard_files<'a>(&self, shards: impl IntoIterator<Item = (u32, &'a [f32])>) {
        for (shard, values) in shards {
            if !self.write_shard_file(shard, values) {
                return;
            }
        }
    }

    /// Makes sure `shard`'s file is written; `false` (warned once) when it cannot be, or there is
    /// no shared-memory directory.
    fn write_shard_file(&self, shard: u32, values: &[f32]) -> bool {
        let Some(dir) = &self.shared_dir else {
            return false;
        };
        match dir.write_shard(shard, values) {
            Ok(()) => true,
            Err(e) => {
                if !self.shard_files_refused.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        "cannot write shard {shard} to {}: {e}; this and later shards are \
                         streamed instead",
                        dir.path().display()
                    );
                }
                false
            }
        }
    }

    /// Resident buffers for `workers` gradients of `param_len` values (up to the pool's size), so
    /// that the first step's results are not copied into fresh pages. Blocking. None when the
    /// workers are all on this host (`co_located`, `--local`) and their results are read where
    /// they wrote them (shared memory, no `--verify` copies): the buffers would hold `workers`
    /// times the model's size for nothing; a worker that falls back to sending its tensors takes
    /// buffers as its results come.
    pub fn reserve_gradient_buffers(&self, param_len: usize, workers: usize, co_located: bool) {
        if co_located && self.shared_dir.is_some() && !self.copy_gradients {
            return;
        }
        for _ in self.gradient_buffers.len()..workers.min(POOL_KEEPS) {
            self.gradient_buffers
                .give_back(common::memory::resident_zeros(param_len));
        }
    }

    /// Makes the parameter files now, for a run whose workers are known to be on this host
    /// (`--local`): otherwise steps 0-3 each make one (1-2 ms apiece on a 2-core VM), and a
    /// coordinator whose workers are all remote would hold them for nothing. Blocking; a failure
    /// (a full `/dev/shm`) only leaves them to be made at first use.
    pub fn prepare_parameter_files(&self, param_len: usize) {
        if let Some(dir) = &self.shared_dir
            && let Err(e) = dir.prepare_params(param_len)
        {
            tracing::debug!(
                "parameter files not prepared in {}: {e}; each is made at its first step",
                dir.path().display()
            );
        }
    }

    /// Whether `shard`'s file is already written (cheap: no blocking work).
    pub fn has_shard_file(&self, shard: u32) -> bool {
        self.shared_dir.as_ref().is_some_and(|d| d.has_shard(shard))
    }

    /// Runs `update`, which makes the `len` parameters of `step` and returns its result with
    /// whether it made them. When any worker is attached, `update` gets the values of a
    /// parameter file in shared memory and writes the parameters there as it makes them (one
    /// pass over memory fewer than copying them afterwards); co-located tasks of `step` then
    /// read that file. When no worker is attached, `update` writes them into a buffer that
    /// becomes the inline bytes of every task of `step`, with no copy (encoding them from the
    /// parameters in the async thread's `params_for` took 1.3% of a TCP run's samples on an
    /// Emerald Rapids Xeon, docs/scaling.md §41). When no file can be taken (warned once: a full
    /// /dev/shm, workers holding every file), `update` gets `None` and the parameters go inline,
    /// encoded on demand. Called off the async runtime. A failed update publishes nothing.
    pub fn publish_while<R>(
        &self,
        step: u64,
        len: usize,
        update: impl FnOnce(Option<&mut [f32]>) -> (R, bool),
    ) -> R {
        let mut update = Some(update);
        let mut result = None;
        let mut made = false;
        let mut run = |file: Option<&mut [f32]>| {
            let update = update.take().expect("the update runs once");
            let (r, ok) = update(file);
            result = Some(r);
            made = ok;
            ok
        };
        let mut inline = None;
        let shared = match &self.shared_dir {
            Some(dir) if self.any_attached() => match dir.write_params_with(step, len, &mut run) {
                Ok(written) => written,
                Err(e) => {
                    // Warned once: it may last (a full /dev/shm, workers holding every file).
                    if !self.params_inline_warned.swap(true, Ordering::Relaxed) {
                        tracing::warn!(
                            "cannot write parameters to {}: {e}; sending them inline while \
                             this lasts",
                            dir.path().display()
                        );
                    } else {
                        tracing::debug!("step {step}: parameters inline: {e}");
                    }
                    None
                }
            },
            _ => {
                let mut values = self.inline_buffers.take();
                values.resize(len, 0.0);
                if run(Some(&mut values)) {
                    inline = Some(self.inline_buffers.lend(values));
                } else {
                    self.inline_buffers.give_back(values);
                }
                None
            }
        };
        if made {
            *lock(&self.published) = Published {
                step: Some(step),
                inline,
                shared,
            };
        }
        result.expect("write_params_with calls the update once, with or without a file")
    }

    /// The parameter reference for `worker`'s task at `step`; `params` are the state machine's
    /// current parameters (the caller holds its lock, so they are the step's).
    pub fn params_for(&self, worker: u64, step: u64, params: &[f32]) -> TensorRef {
        let mut published = lock(&self.published);
        if published.step != Some(step) {
            *published = Published {
                step: Some(step),
                ..Published::default()
            };
        }
        if let Some(shared) = &published.shared
            && self.is_attached(worker)
        {
            return shared.clone();
        }
        TensorRef::Inline(
            published
                .inline
                .get_or_insert_with(|| proto::tensor::encode_f32(params))
                .clone(),
        )
    }

    /// The values a worker's result refers to, with their magnitude: copied out of a message
    /// (measured as they are copied, so that checking them needs no second pass), or left where
    /// a co-located worker wrote them (measured there; the update reads them in place,
    /// docs/design.md §5), or copied out of there under `--verify`.
    pub fn resolve_gradient(
        &self,
        worker: u64,
        grad: &TensorRef,
    ) -> Result<(ArrivedGradient, Magnitude)> {
        match grad {
            TensorRef::Inline(bytes) => {
                let mut out = self.gradient_buffer();
                let magnitude = proto::tensor::decode_f32_measuring(bytes, &mut out);
                Ok((ArrivedGradient::Owned(out), magnitude))
            }
            TensorRef::Shared { offset, len } => {
                let dir = self
                    .shared_dir
                    .as_ref()
                    .filter(|_| self.is_attached(worker))
                    .ok_or_else(|| {
                        Error::BadRequest(format!(
                            "worker {worker:x} referred to shared memory it is not attached to"
                        ))
                    })?;
                let values = dir.map_gradient(worker, *offset, *len).map_err(|e| {
                    Error::BadRequest(format!(
                        "cannot read worker {worker:x}'s gradient from {}: {e}",
                        dir.path().display()
                    ))
                })?;
                if self.copy_gradients {
                    let mut out = self.gradient_buffer();
                    let magnitude = values.copy_out(&mut out);
                    return Ok((ArrivedGradient::Owned(out), magnitude));
                }
                let magnitude = values.measure();
                Ok((ArrivedGradient::Shared(Arc::new(values)), magnitude))
            }
            TensorRef::ParameterFile { .. } => Err(Error::BadRequest(format!(
                "worker {worker:x} named a parameter file as its gradient"
            ))),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use proto::shared_memory::SharedClient;

    use super::*;

    fn bits(values: &[f32]) -> Vec<u32> {
        values.iter().map(|v| v.to_bits()).collect()
    }

    /// The update runs exactly once on every path; what it made is published for its step, a
    /// failed one publishes nothing, and the parameter file is used only while one is free.
    #[test]
    fn an_update_runs_once_and_only_what_it_made_is_published() {
        let want: Vec<f32> = (0..300).map(|i| i as f32 * 0.25 - 7.0).collect();
        let inline = TensorRef::Inline(proto::tensor::encode_f32(&want));

        // No shared memory: the update writes into a buffer that every task of the step sends
        // inline as it is (not the parameters `params_for` is given); the buffer is reused once
        // the step's replies are gone.
        let tcp = Transport::new(None);
        let mut calls = 0;
        let mut written = std::ptr::null();
        let r = tcp.publish_while(3, want.len(), |buffer| {
            calls += 1;
            let buffer = buffer.expect("a buffer for the inline parameters");
            buffer.copy_from_slice(&want);
            written = buffer.as_ptr();
            ("made", true)
        });
        assert_eq!((r, calls), ("made", 1));
        let sent = tcp.params_for(1, 3, &[0.0; 300]);
        assert_eq!(sent, inline);
        assert_eq!(tcp.params_for(2, 3, &[]), inline, "every task of the step");
        let TensorRef::Inline(bytes) = &sent else {
            unreachable!()
        };
        assert_eq!(bytes.as_ptr(), written.cast::<u8>(), "sent without a copy");
        drop(sent);
        // The next steps write other buffers while step 3's is published or still being sent.
        let still_sending = tcp.params_for(1, 3, &[]);
        let (four, five) = (vec![4.0; 300], vec![5.0; 300]);
        for (step, values) in [(4, &four), (5, &five)] {
            tcp.publish_while(step, want.len(), |buffer| {
                let buffer = buffer.unwrap();
                assert_ne!(buffer.as_ptr(), written, "step {step}: step 3's is in use");
                buffer.copy_from_slice(values);
                ((), true)
            });
        }
        assert_eq!(still_sending, inline, "a reply being sent keeps its values");
        drop(still_sending);
        // Once sent, step 3's buffer is reused; a failed update publishes nothing.
        tcp.publish_while(6, want.len(), |buffer| {
            let buffer = buffer.unwrap();
            assert_eq!(buffer.as_ptr(), written, "step 3's, given back");
            buffer.fill(f32::NAN);
            ((), false)
        });
        let five_sent = TensorRef::Inline(proto::tensor::encode_f32(&five));
        assert_eq!(
            tcp.params_for(1, 5, &[]),
            five_sent,
            "step 5's are still sent"
        );
        tcp.publish_while(7, want.len(), |buffer| {
            let failed = "the failed update's buffer, given back";
            assert_eq!(buffer.unwrap().as_ptr(), written, "{failed}");
            ((), true)
        });

        let base = tempfile::tempdir().unwrap();
        let dir = SharedDir::create(base.path(), "t", b"probe").unwrap();
        let transport = Transport::new(Some(dir));
        let offer = transport.offer().unwrap();
        let (client, probe) = SharedClient::open(&offer, 7).unwrap();
        assert!(transport.attach(7, &Attach { probe }));

        // A free file: the update writes the parameters there, and step 5's tasks name it.
        let mut calls = 0;
        transport.publish_while(5, want.len(), |file| {
            calls += 1;
            file.expect("a free file").copy_from_slice(&want);
            ((), true)
        });
        assert_eq!(calls, 1);
        let published = transport.params_for(7, 5, &want);
        let TensorRef::ParameterFile { slot, len } = published.clone() else {
            panic!("step 5 is in a file: {published:?}")
        };
        let lease = client.lease_params(slot, 5, len).unwrap().unwrap();
        assert_eq!(bits(lease.values()), bits(&want));
        drop(lease);
        assert_eq!(transport.params_for(8, 5, &want), inline, "not attached");

        // A failed update publishes nothing: step 5's parameters stay where they were.
        let r = transport.publish_while(6, want.len(), |file| {
            file.expect("a free file").fill(f32::NAN);
            ("optimizer failed", false)
        });
        assert_eq!(r, "optimizer failed");
        assert_eq!(transport.params_for(7, 5, &want), published);

        // Workers holding every file: the update runs once without one; step 19 goes inline.
        let leases: Vec<_> = (10..14)
            .map(|step| {
                transport.publish_while(step, want.len(), |file| {
                    file.expect("a free file").copy_from_slice(&want);
                    ((), true)
                });
                let TensorRef::ParameterFile { slot, len } = transport.params_for(7, step, &want)
                else {
                    panic!("step {step} is in a file")
                };
                client.lease_params(slot, step, len).unwrap().unwrap()
            })
            .collect();
        let mut calls = Vec::new();
        transport.publish_while(19, want.len(), |file| {
            calls.push(file.is_some());
            ((), true)
        });
        assert_eq!(calls, [false], "called once, without a file");
        assert_eq!(transport.params_for(7, 19, &want), inline);
        drop(leases);
    }

    /// Shard files written ahead (a `--local` run) are there before any worker asks, and serve
    /// only attached workers; without shared memory, writing them ahead does nothing.
    #[test]
    fn shard_files_written_ahead_serve_attached_workers() {
        let rows: Vec<Vec<f32>> = (0..3).map(|s| vec![s as f32; 8]).collect();
        let shards = || {
            rows.iter()
                .enumerate()
                .map(|(s, r)| (s as u32, r.as_slice()))
        };

        let tcp = Transport::new(None);
        tcp.write_shard_files(shards());
        assert!(!tcp.has_shard_file(0));
        tcp.prepare_parameter_files(100);
        tcp.reserve_gradient_buffers(100, 2, true);
        assert_eq!(
            tcp.gradient_buffer().len(),
            100,
            "a resident buffer of the parameters' length"
        );

        let base = tempfile::tempdir().unwrap();
        let transport = Transport::new(Some(SharedDir::create(base.path(), "s", b"p").unwrap()));
        // Co-located results are read in place: no buffer is held for them, unless they are
        // copied (`--verify`) or the workers may be elsewhere.
        transport.reserve_gradient_buffers(100, 2, true);
        assert_eq!(transport.gradient_buffers.len(), 0);
        transport.reserve_gradient_buffers(100, 2, false);
        assert_eq!(transport.gradient_buffers.len(), 2);
        let dir = SharedDir::create(base.path(), "v", b"p").unwrap();
        let verifying = Transport::new(Some(dir)).copying_gradients(true);
        verifying.reserve_gradient_buffers(100, 2, true);
        assert_eq!(verifying.gradient_buffers.len(), 2);
        transport.write_shard_files(shards());
        assert!((0..3).all(|s| transport.has_shard_file(s)));
        assert!(!transport.has_shard_file(3));
        assert!(
            !transport.shard_in_shared_memory(7, 0, &rows[0]),
            "not attached"
        );
        let (client, probe) = SharedClient::open(&transport.offer().unwrap(), 7).unwrap();
        assert!(transport.attach(7, &Attach { probe }));
        assert!(transport.shard_in_shared_memory(7, 2, &rows[2]));
        let file = client.map_shard(2, 0, 8).unwrap();
        assert_eq!(bits(file.values()), bits(&rows[2]));
    }
}

//! A co-located worker's calls without gRPC: `NextTask` and `SubmitResult` as bytes in a file of
//! the shared-memory directory that both processes map, with a `futex` on a word of that file as
//! the doorbell. One call is outstanding at a time: the worker writes a request and bumps its
//! sequence number, the coordinator's thread for that worker wakes, answers, and bumps the reply's.
//!
//! Why: a gRPC call between processes on one host costs 0.3-0.4 ms each way on our 2-core
//! machines (HTTP/2 framing and a wake-up of each side's runtime), twice on every step's critical
//! path; a futex wake costs tens of microseconds (docs/scaling.md §26). Registration, shards and
//! heartbeats stay on gRPC, and so does every worker the directory's probe does not reach.
//!
//! What keeps it correct:
//! - Each side writes only its own part: the worker the request area and words, the coordinator
//!   the reply area and words (and the header, once, before the worker learns of the file).
//! - A length and the bytes it covers are stored before the sequence number that publishes them
//!   (release) and read after it (acquire), and copied out before they are decoded. The worker
//!   posts its next request only after the answer to the last (a worker that stops waiting
//!   registers again, with a new mailbox), so an honest worker never writes a request while it
//!   is read; one that did would only garble its own call.
//! - Each side sleeps on a doorbell word the other side bumps after publishing (and `close` bumps
//!   both), read before the state it checks, so a wake-up between the check and the sleep is
//!   never lost.
//! - Nothing read is trusted: lengths are checked against the areas, bytes are decoded as
//!   messages from that peer (`MailboxRequest`/`MailboxReply`) and checked as the service checks
//!   them.
//! - Waits are bounded: both sides wake at least every few hundred milliseconds to notice a
//!   closed mailbox or a peer that is gone.

use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use prost::Message;
use rustix::thread::futex;

use crate::pb;
use crate::shared_memory::SharedMap;

/// The worker's words: the number of its latest request, that request's length, and the
/// coordinator's doorbell (bumped after each request, and by `close`).
const REQUEST_SEQ: usize = 0;
const REQUEST_LEN: usize = 4;
const REQUEST_BELL: usize = 8;
/// The coordinator's words, on a cache line of their own: the number of the request last
/// answered, that answer's length, whether the coordinator has stopped serving the mailbox, and
/// the worker's doorbell (bumped after each answer, and by `close`).
const REPLY_SEQ: usize = 64;
const REPLY_LEN: usize = 68;
const CLOSED: usize = 72;
const REPLY_BELL: usize = 76;
/// Written once by the coordinator when it creates the file: the two areas' sizes.
const REQUEST_CAPACITY: usize = 80;
const REPLY_CAPACITY: usize = 84;
/// Bytes before the request area.
const HEADER: usize = 128;

/// A mailbox file, mapped; the same type on both sides (each uses its side's methods).
#[derive(Debug)]
pub struct Mailbox {
    map: SharedMap,
    request_capacity: usize,
    reply_capacity: usize,
}

/// How a wait for the other side ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Waited<T> {
    Ready(T),
    TimedOut,
    /// The coordinator stopped serving this mailbox (the worker was forgotten, or the run ends).
    Closed,
}

impl Mailbox {
    /// The coordinator's side: creates the file at `path` (a new file, never one that exists,
    /// which another process may have mapped; mode 0600, zeros) with room for a request of
    /// `request_capacity` bytes and a reply of `reply_capacity`.
    pub fn create(path: &Path, request_capacity: u32, reply_capacity: u32) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)?;
        let len = HEADER as u64 + u64::from(request_capacity) + u64::from(reply_capacity);
        let map = SharedMap::create(file, len)?;
        map.word(REQUEST_CAPACITY)
            .store(request_capacity, Ordering::Relaxed);
        map.word(REPLY_CAPACITY)
            .store(reply_capacity, Ordering::Relaxed);
        Ok(Mailbox {
            map,
            request_capacity: request_capacity as usize,
            reply_capacity: reply_capacity as usize,
        })
    }

    /// The worker's side: maps the file the coordinator created, checking its header against
    /// its size.
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        if (file.metadata()?.len() as usize) < HEADER {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("mailbox {} is shorter than its header", path.display()),
            ));
        }
        let map = SharedMap::open(file)?;
        let request_capacity = map.word(REQUEST_CAPACITY).load(Ordering::Relaxed) as usize;
        let reply_capacity = map.word(REPLY_CAPACITY).load(Ordering::Relaxed) as usize;
        if HEADER + request_capacity + reply_capacity > map.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "mailbox {} names areas of {request_capacity} and {reply_capacity} bytes \
                     but has {}",
                    path.display(),
                    map.len()
                ),
            ));
        }
        Ok(Mailbox {
            map,
            request_capacity,
            reply_capacity,
        })
    }

    /// The largest request the worker may post.
    pub fn request_capacity(&self) -> usize {
        self.request_capacity
    }

    /// The largest answer the coordinator may publish.
    pub fn reply_capacity(&self) -> usize {
        self.reply_capacity
    }

    fn word(&self, offset: usize) -> &AtomicU32 {
        self.map.word(offset)
    }

    /// Worker: posts request number `seq` (one more than the last) and rings the doorbell.
    /// `InvalidInput` when it does not fit (the caller then uses the service instead).
    pub fn post(&self, seq: u32, request: &[u8]) -> io::Result<()> {
        fits("request", request, self.request_capacity)?;
        self.map.write(HEADER, request);
        self.word(REQUEST_LEN)
            .store(request.len() as u32, Ordering::Relaxed);
        self.word(REQUEST_SEQ).store(seq, Ordering::Release);
        ring(self.word(REQUEST_BELL))
    }

    /// Worker: waits up to `timeout` for the answer to request `seq`, copied into `out`.
    pub fn wait_reply(
        &self,
        seq: u32,
        timeout: Duration,
        out: &mut Vec<u8>,
    ) -> io::Result<Waited<()>> {
        let deadline = Instant::now() + timeout;
        loop {
            let bell = self.word(REPLY_BELL).load(Ordering::Acquire);
            if self.word(REPLY_SEQ).load(Ordering::Acquire) == seq {
                let len = self.word(REPLY_LEN).load(Ordering::Relaxed) as usize;
                if len > self.reply_capacity {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "the coordinator's reply claims {len} bytes, more than the mailbox's \
                             {}",
                            self.reply_capacity
                        ),
                    ));
                }
                out.resize(len, 0);
                self.map.read(HEADER + self.request_capacity, out);
                return Ok(Waited::Ready(()));
            }
            if self.is_closed() {
                return Ok(Waited::Closed);
            }
            if !sleep_while(self.word(REPLY_BELL), bell, deadline)? {
                return Ok(Waited::TimedOut);
            }
        }
    }

    /// Coordinator: waits up to `timeout` for a request after number `answered`, copied into
    /// `out`, and returns its number. A request longer than its area is returned empty (it then
    /// fails to decode as a call, and the answer says so).
    pub fn wait_request(
        &self,
        answered: u32,
        timeout: Duration,
        out: &mut Vec<u8>,
    ) -> io::Result<Waited<u32>> {
        let deadline = Instant::now() + timeout;
        loop {
            let bell = self.word(REQUEST_BELL).load(Ordering::Acquire);
            if self.is_closed() {
                return Ok(Waited::Closed);
            }
            let seq = self.word(REQUEST_SEQ).load(Ordering::Acquire);
            if seq != answered {
                let len = self.word(REQUEST_LEN).load(Ordering::Relaxed) as usize;
                out.clear();
                if len <= self.request_capacity {
                    out.resize(len, 0);
                    self.map.read(HEADER, out);
                }
                return Ok(Waited::Ready(seq));
            }
            if !sleep_while(self.word(REQUEST_BELL), bell, deadline)? {
                return Ok(Waited::TimedOut);
            }
        }
    }

    /// Coordinator: publishes the answer to request `seq` and wakes the worker. `InvalidInput`
    /// when it does not fit (the caller answers with an error instead).
    pub fn reply(&self, seq: u32, reply: &[u8]) -> io::Result<()> {
        fits("reply", reply, self.reply_capacity)?;
        self.map.write(HEADER + self.request_capacity, reply);
        self.word(REPLY_LEN)
            .store(reply.len() as u32, Ordering::Relaxed);
        self.word(REPLY_SEQ).store(seq, Ordering::Release);
        ring(self.word(REPLY_BELL))
    }

    /// Coordinator: stops serving; both sides' waits end with [`Waited::Closed`].
    pub fn close(&self) {
        self.word(CLOSED).store(1, Ordering::Release);
        // A failed ring only delays a waiter to the end of its slice.
        let _ = ring(self.word(REPLY_BELL));
        let _ = ring(self.word(REQUEST_BELL));
    }

    pub fn is_closed(&self) -> bool {
        self.word(CLOSED).load(Ordering::Acquire) != 0
    }
}

/// A call through a mailbox: what the service's `NextTask` and `SubmitResult` take.
#[derive(Debug, Clone, PartialEq)]
pub enum Call {
    NextTask,
    SubmitResult(pb::SubmitRequest),
}

/// The answer to a [`Call`]: what the service returns, or the error it would have returned.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    NextTask(pb::NextTaskReply),
    SubmitResult(pb::SubmitReply),
    Error(String),
}

impl Call {
    /// A `NextTask` call's bytes.
    pub fn encode_next_task() -> Vec<u8> {
        let mut bytes = Vec::new();
        prost::encoding::message::encode(1, &pb::NextTaskRequest {}, &mut bytes);
        bytes
    }

    /// A `SubmitResult` call's bytes (by reference: the caller keeps the request for the
    /// service should the mailbox not take it).
    pub fn encode_submit_result(request: &pb::SubmitRequest) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(request.encoded_len() + 8);
        prost::encoding::message::encode(2, request, &mut bytes);
        bytes
    }

    /// A request's bytes as the worker wrote them; the error says what was wrong.
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        use pb::mailbox_request::Call as Wire;
        match pb::MailboxRequest::decode(bytes) {
            Ok(pb::MailboxRequest {
                call: Some(Wire::NextTask(_)),
            }) => Ok(Call::NextTask),
            Ok(pb::MailboxRequest {
                call: Some(Wire::SubmitResult(request)),
            }) => Ok(Call::SubmitResult(request)),
            Ok(pb::MailboxRequest { call: None }) => Err("the mailbox held no call this \
                                                          coordinator knows: run the same \
                                                          release on both sides"
                .into()),
            Err(e) => Err(format!("the mailbox held an undecodable call: {e}")),
        }
    }
}

impl Answer {
    /// Removes a task's next-step hint (`Task::next_examples`, which only saves the worker time)
    /// when the encoded answer would not fit `capacity` bytes with it: a task with inline
    /// parameters and a very large batch per worker may still fit without it.
    pub fn drop_hint_beyond(&mut self, capacity: usize) {
        use pb::next_task_reply::Kind;
        // The answer's wrapping (`MailboxReply`'s tag and length) takes at most 11 bytes.
        const WRAPPING: usize = 16;
        if let Answer::NextTask(reply) = self
            && reply.encoded_len() + WRAPPING > capacity
            && let Some(Kind::Task(task)) = &mut reply.kind
        {
            task.next_examples.clear();
        }
    }

    pub fn encode(self) -> Vec<u8> {
        use pb::mailbox_reply::Answer as Wire;
        let answer = match self {
            Answer::NextTask(reply) => Wire::NextTask(reply),
            Answer::SubmitResult(reply) => Wire::SubmitResult(reply),
            Answer::Error(message) => Wire::Error(message),
        };
        pb::MailboxReply {
            answer: Some(answer),
        }
        .encode_to_vec()
    }

    /// A reply's bytes as the coordinator wrote them.
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        use pb::mailbox_reply::Answer as Wire;
        match pb::MailboxReply::decode(bytes) {
            Ok(pb::MailboxReply {
                answer: Some(answer),
            }) => Ok(match answer {
                Wire::NextTask(reply) => Answer::NextTask(reply),
                Wire::SubmitResult(reply) => Answer::SubmitResult(reply),
                Wire::Error(message) => Answer::Error(message),
            }),
            Ok(pb::MailboxReply { answer: None }) => {
                Err("the coordinator's mailbox reply held no answer".into())
            }
            Err(e) => Err(format!(
                "the coordinator's mailbox reply did not decode: {e}"
            )),
        }
    }
}

/// `InvalidInput` when `bytes` are more than an area of `capacity` holds.
fn fits(what: &str, bytes: &[u8], capacity: usize) -> io::Result<()> {
    if bytes.len() > capacity {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "a {what} of {} bytes does not fit the mailbox's {capacity}",
                bytes.len()
            ),
        ));
    }
    Ok(())
}

/// Bumps a doorbell word (after what it announces is stored) and wakes whoever sleeps on it.
fn ring(bell: &AtomicU32) -> io::Result<()> {
    bell.fetch_add(1, Ordering::Release);
    futex::wake(bell, futex::Flags::empty(), u32::MAX)?;
    Ok(())
}

/// Sleeps on `word` while it holds `value`, until woken or `deadline`; `false` once the deadline
/// has passed. Shared (not process-private) futexes: the word is in a mapping of another process.
fn sleep_while(word: &AtomicU32, value: u32, deadline: Instant) -> io::Result<bool> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Ok(false);
    }
    let timeout = futex::Timespec {
        tv_sec: left.as_secs() as i64,
        tv_nsec: i64::from(left.subsec_nanos()),
    };
    match futex::wait(word, futex::Flags::empty(), value, Some(&timeout)) {
        // Woken, the word already changed, a signal, or the slice ended: the caller looks again.
        Ok(())
        | Err(rustix::io::Errno::AGAIN)
        | Err(rustix::io::Errno::INTR)
        | Err(rustix::io::Errno::TIMEDOUT) => Ok(true),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn pair(dir: &Path) -> (Arc<Mailbox>, Arc<Mailbox>) {
        let path = dir.join("mail");
        let coordinator = Mailbox::create(&path, 256, 1024).unwrap();
        let worker = Mailbox::open(&path).unwrap();
        (Arc::new(coordinator), Arc::new(worker))
    }

    /// A task whose next-step hint would overflow the reply area goes without it, and only then.
    #[test]
    fn a_hint_that_would_not_fit_is_dropped() {
        use crate::messages::{NodeWork, ShardWork, Task, TaskReply, TensorRef};
        let examples: Vec<u32> = (0..64).collect();
        let task = TaskReply::Task(Task {
            step: 1,
            epoch: 0,
            params: TensorRef::ParameterFile { slot: 0, len: 10 },
            nodes: vec![NodeWork {
                node: common::train::Node { lo: 0, hi: 1 },
                shards: vec![ShardWork {
                    shard: 0,
                    examples: examples.clone(),
                }],
            }],
            run_id: "r".into(),
            next_examples: vec![ShardWork { shard: 0, examples }],
        });
        let answer = || Answer::NextTask(task.clone().into());
        let with_hint = answer().encode().len();
        let mut roomy = answer();
        roomy.drop_hint_beyond(with_hint + 16);
        assert_eq!(roomy.encode().len(), with_hint, "kept when it fits");
        let mut tight = answer();
        tight.drop_hint_beyond(with_hint);
        let without = tight.encode();
        assert!(
            without.len() + 60 < with_hint,
            "dropped: {} bytes",
            without.len()
        );
        let Ok(Answer::NextTask(reply)) = Answer::decode(&without) else {
            panic!("decodes");
        };
        let Ok(TaskReply::Task(task)) = TaskReply::try_from(reply) else {
            panic!("a task");
        };
        assert!(task.next_examples.is_empty() && task.nodes[0].shards[0].examples.len() == 64);
    }

    /// Calls go back and forth between two mappings of one file, as between two processes;
    /// every answer is the one to its own request.
    #[test]
    fn calls_are_answered_in_order_across_threads() {
        let dir = tempfile::tempdir().unwrap();
        let (coordinator, worker) = pair(dir.path());
        let server = std::thread::spawn(move || {
            let mut answered = 0;
            let mut request = Vec::new();
            loop {
                match coordinator
                    .wait_request(answered, Duration::from_secs(5), &mut request)
                    .unwrap()
                {
                    Waited::Ready(seq) => {
                        let mut reply = request.clone();
                        reply.reverse();
                        reply.extend_from_slice(&seq.to_le_bytes());
                        coordinator.reply(seq, &reply).unwrap();
                        answered = seq;
                    }
                    Waited::Closed => return answered,
                    Waited::TimedOut => panic!("no request for 5 s"),
                }
            }
        });
        let mut reply = Vec::new();
        for seq in 1..=2000u32 {
            let request: Vec<u8> = (0..(seq % 200) as u8).collect();
            worker.post(seq, &request).unwrap();
            let waited = worker
                .wait_reply(seq, Duration::from_secs(5), &mut reply)
                .unwrap();
            assert_eq!(waited, Waited::Ready(()));
            let mut want = request.clone();
            want.reverse();
            want.extend_from_slice(&seq.to_le_bytes());
            assert_eq!(reply, want, "request {seq}");
        }
        assert!(!worker.is_closed());
        // The worker's handle closes for the test: the flag is in the shared file either way.
        let path = dir.path().join("mail");
        Mailbox::open(&path).unwrap().close();
        assert_eq!(server.join().unwrap(), 2000);
        assert!(worker.is_closed());
    }

    #[test]
    fn waits_end_at_their_timeout_or_when_closed() {
        let dir = tempfile::tempdir().unwrap();
        let (coordinator, worker) = pair(dir.path());
        let mut out = Vec::new();
        let started = Instant::now();
        let waited = coordinator
            .wait_request(0, Duration::from_millis(30), &mut out)
            .unwrap();
        assert_eq!(waited, Waited::TimedOut);
        assert!(started.elapsed() >= Duration::from_millis(30));
        worker.post(1, b"call").unwrap();
        assert_eq!(
            worker
                .wait_reply(1, Duration::from_millis(30), &mut out)
                .unwrap(),
            Waited::TimedOut
        );
        // A worker waiting when the coordinator closes is woken at once, not at its timeout.
        let waiting = {
            let worker = Arc::clone(&worker);
            std::thread::spawn(move || {
                let started = Instant::now();
                let waited = worker
                    .wait_reply(1, Duration::from_secs(30), &mut Vec::new())
                    .unwrap();
                (waited, started.elapsed())
            })
        };
        std::thread::sleep(Duration::from_millis(20));
        coordinator.close();
        let (waited, took) = waiting.join().unwrap();
        assert_eq!(waited, Waited::Closed);
        assert!(took < Duration::from_secs(10), "woken after {took:?}");
        assert_eq!(
            coordinator
                .wait_request(0, Duration::from_secs(30), &mut out)
                .unwrap(),
            Waited::Closed
        );
    }

    /// The hand-encoded calls are the `MailboxRequest`s the coordinator decodes.
    #[test]
    fn calls_and_answers_round_trip() {
        assert_eq!(Call::decode(&Call::encode_next_task()), Ok(Call::NextTask));
        let request = pb::SubmitRequest {
            step: 7,
            results: Vec::new(),
            compute_seconds: 0.25,
        };
        assert_eq!(
            Call::decode(&Call::encode_submit_result(&request)),
            Ok(Call::SubmitResult(request))
        );
        assert!(Call::decode(&[]).unwrap_err().contains("no call"));
        assert!(
            Call::decode(&[0xff; 3])
                .unwrap_err()
                .contains("undecodable")
        );
        for answer in [
            Answer::NextTask(pb::NextTaskReply { kind: None }),
            Answer::SubmitResult(pb::SubmitReply {
                accepted: true,
                reason: "fine".into(),
            }),
            Answer::Error("gone".into()),
        ] {
            assert_eq!(Answer::decode(&answer.clone().encode()), Ok(answer));
        }
        assert!(Answer::decode(&[]).unwrap_err().contains("no answer"));
    }

    /// What either side finds in the file is checked before it is used.
    #[test]
    fn sizes_are_checked_on_both_sides() {
        let dir = tempfile::tempdir().unwrap();
        let (coordinator, worker) = pair(dir.path());
        let too_long = vec![7u8; 257];
        let err = worker.post(1, &too_long).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(err.to_string().contains("257 bytes"), "{err}");
        let err = coordinator.reply(1, &[0; 1025]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);

        // A request whose length word claims more than its area arrives empty.
        worker.post(1, b"fine").unwrap();
        worker.word(REQUEST_LEN).store(u32::MAX, Ordering::Relaxed);
        let mut out = b"old".to_vec();
        assert_eq!(
            coordinator
                .wait_request(0, Duration::from_secs(1), &mut out)
                .unwrap(),
            Waited::Ready(1)
        );
        assert!(out.is_empty());

        // A reply whose length word claims more than its area is an error, not a long read.
        coordinator.reply(1, b"ok").unwrap();
        coordinator
            .word(REPLY_LEN)
            .store(1 << 20, Ordering::Relaxed);
        let err = worker
            .wait_reply(1, Duration::from_secs(1), &mut out)
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);

        // A header naming areas larger than the file is refused at open.
        coordinator
            .word(REPLY_CAPACITY)
            .store(1 << 30, Ordering::Relaxed);
        let err = Mailbox::open(&dir.path().join("mail")).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        std::fs::write(dir.path().join("short"), [0u8; 16]).unwrap();
        let err = Mailbox::open(&dir.path().join("short")).unwrap_err();
        assert!(err.to_string().contains("shorter than its header"), "{err}");
    }

    /// A worker maps the whole file read-write, so a hostile one can write anything anywhere,
    /// any time: the coordinator's words and the header included, while the coordinator reads.
    /// Its side must still only copy out what fits the request area it made (by the capacities
    /// it keeps, not the header's), hand every copy to the decoder (which names what is wrong),
    /// answer each, and serve again once calls are posted properly.
    #[test]
    #[cfg_attr(miri, ignore)]
    fn a_worker_scribbling_over_the_whole_file_cannot_break_the_coordinators_side() {
        use rand::{RngExt, SeedableRng};
        use std::sync::atomic::AtomicBool;
        let dir = tempfile::tempdir().unwrap();
        let (coordinator, worker) = pair(dir.path());
        let len = coordinator.map.len();
        let stop = Arc::new(AtomicBool::new(false));
        let scribbler = {
            let (worker, stop) = (Arc::clone(&worker), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(7);
                let mut writes = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    // Any word of the header but `CLOSED` (a worker that closes its own
                    // mailbox only ends it: `waits_end_at_their_timeout_or_when_closed`), runs
                    // of bytes over both areas, and the coordinator's doorbell. Words are
                    // written as atomics and the areas as bytes, as each side accesses them.
                    // This thread stands in for the worker's process: its byte writes race with
                    // the coordinator's copies as that process's would, which within one
                    // process is formally a data race (hence no Miri run).
                    match rng.random_range(0..4) {
                        0 => {
                            let at = rng.random_range(0..HEADER / 4) * 4;
                            if at != CLOSED {
                                worker.word(at).store(rng.random(), Ordering::Relaxed);
                            }
                        }
                        1 => worker.word(REQUEST_LEN).store(
                            rng.random_range(0..2 * worker.request_capacity as u32),
                            Ordering::Relaxed,
                        ),
                        2 => {
                            let at = rng.random_range(HEADER..len);
                            let bytes: Vec<u8> = (0..rng.random_range(1..=(len - at).min(300)))
                                .map(|_| rng.random())
                                .collect();
                            worker.map.write(at, &bytes);
                        }
                        _ => {
                            worker.word(REQUEST_SEQ).fetch_add(1, Ordering::Release);
                            ring(worker.word(REQUEST_BELL)).unwrap();
                        }
                    }
                    writes += 1;
                }
                writes
            })
        };
        let (mut answered, mut request, mut served, mut undecodable) = (0, Vec::new(), 0, 0);
        let started = Instant::now();
        while served < 2000 && started.elapsed() < Duration::from_secs(20) {
            match coordinator
                .wait_request(answered, Duration::from_millis(50), &mut request)
                .unwrap()
            {
                Waited::Ready(seq) => {
                    assert!(request.len() <= 256, "copied {} bytes", request.len());
                    let answer = match Call::decode(&request) {
                        Ok(_) => Answer::Error("a call, read as it was being written".into()),
                        Err(why) => {
                            assert!(why.contains("mailbox"), "{why}");
                            undecodable += 1;
                            Answer::Error(why)
                        }
                    };
                    coordinator.reply(seq, &answer.encode()).unwrap();
                    (answered, served) = (seq, served + 1);
                }
                Waited::TimedOut => {}
                Waited::Closed => panic!("the scribbler never writes CLOSED"),
            }
        }
        stop.store(true, Ordering::Relaxed);
        let writes = scribbler.join().unwrap();
        assert!(
            served >= 100 && undecodable > 0,
            "{served} served, {writes} writes"
        );
        assert_eq!(
            (coordinator.request_capacity(), coordinator.reply_capacity()),
            (256, 1024),
            "the coordinator's areas are its own, whatever the header now says"
        );

        // The scribbling over, a call posted properly is answered as ever.
        let seq = answered.wrapping_add(1);
        worker.post(seq, &Call::encode_next_task()).unwrap();
        let mut out = Vec::new();
        let waited = coordinator
            .wait_request(answered, Duration::from_secs(5), &mut out)
            .unwrap();
        assert_eq!(waited, Waited::Ready(seq));
        assert_eq!(Call::decode(&out), Ok(Call::NextTask));
        let answer = Answer::Error("fine".into());
        coordinator.reply(seq, &answer.clone().encode()).unwrap();
        assert_eq!(
            worker
                .wait_reply(seq, Duration::from_secs(5), &mut out)
                .unwrap(),
            Waited::Ready(())
        );
        assert_eq!(Answer::decode(&out), Ok(answer));
    }
}

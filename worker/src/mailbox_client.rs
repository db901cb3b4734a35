//! The worker's side of its mailbox (`proto::mailbox`): `NextTask` and `SubmitResult` without
//! gRPC when the coordinator is on this host (docs/design.md §5).

use std::time::{Duration, Instant};

use proto::mailbox::{Answer, Mailbox, Waited};

/// How long a wait for the answer blocks the (single-threaded) runtime before it yields, so
/// that the heartbeat keeps running during long polls.
const SLICE: Duration = Duration::from_millis(50);

/// This worker's mailbox and the number of its last request.
#[derive(Debug)]
pub struct MailboxClient {
    mailbox: Mailbox,
    seq: u32,
    reply: Vec<u8>,
    /// How long to wait for an answer before giving up on the coordinator.
    timeout: Duration,
}

/// How a call through the mailbox ended.
#[derive(Debug, PartialEq)]
pub enum Outcome {
    Answered(Answer),
    /// Nothing was posted (the mailbox is closed, the call does not fit, or the coordinator
    /// seems gone): make the call through the service.
    UseService,
    /// The call was posted but no answer will be read: register again (with a new worker id and
    /// mailbox), so the coordinator can never act on this call and a repeat of it.
    GiveUp(String),
}

impl MailboxClient {
    pub fn new(mailbox: Mailbox, timeout: Duration) -> Self {
        MailboxClient {
            mailbox,
            seq: 0,
            reply: Vec::new(),
            timeout,
        }
    }

    /// Posts `request` (a `proto::mailbox::Call`'s bytes), runs `meanwhile` while the
    /// coordinator handles it, and waits for the answer; `meanwhile` runs only if the call was
    /// posted. It blocks the runtime (heartbeats included) and is not under the call's timeout,
    /// so it must be short; an answer that arrives meanwhile is read after it. `alive` is the
    /// heartbeat's view of the coordinator: checked before posting, and between slices of the
    /// wait (a dead coordinator is noticed within a heartbeat interval).
    pub async fn call(
        &mut self,
        request: &[u8],
        alive: impl Fn() -> bool,
        meanwhile: impl FnOnce(),
    ) -> Outcome {
        if !alive() || self.mailbox.is_closed() || request.len() > self.mailbox.request_capacity() {
            return Outcome::UseService;
        }
        self.seq = self.seq.wrapping_add(1);
        if let Err(e) = self.mailbox.post(self.seq, request) {
            return Outcome::GiveUp(format!("the mailbox failed: {e}"));
        }
        meanwhile();
        let started = Instant::now();
        loop {
            match self.mailbox.wait_reply(self.seq, SLICE, &mut self.reply) {
                Ok(Waited::Ready(())) => {
                    return match Answer::decode(&self.reply) {
                        Ok(answer) => Outcome::Answered(answer),
                        Err(e) => Outcome::GiveUp(e),
                    };
                }
                Ok(Waited::Closed) => {
                    return Outcome::GiveUp("the coordinator closed this worker's mailbox".into());
                }
                Ok(Waited::TimedOut) => {}
                Err(e) => return Outcome::GiveUp(format!("the mailbox failed: {e}")),
            }
            if !alive() {
                return Outcome::GiveUp(
                    "the coordinator stopped answering heartbeats during a call".into(),
                );
            }
            if started.elapsed() >= self.timeout {
                return Outcome::GiveUp(format!(
                    "no answer through the mailbox in {:.0} s",
                    self.timeout.as_secs_f64()
                ));
            }
            tokio::task::yield_now().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::mailbox::Call;
    use std::cell::Cell;

    fn pair(dir: &std::path::Path, timeout: Duration) -> (Mailbox, MailboxClient) {
        let path = dir.join("mail");
        let coordinator = Mailbox::create(&path, 1024, 1024).unwrap();
        let worker = MailboxClient::new(Mailbox::open(&path).unwrap(), timeout);
        (coordinator, worker)
    }

    /// Nothing is posted when the service must take the call, so the coordinator can never
    /// answer it twice.
    #[tokio::test]
    async fn calls_the_mailbox_cannot_take_are_not_posted() {
        let dir = tempfile::tempdir().unwrap();
        let (coordinator, mut worker) = pair(dir.path(), Duration::from_secs(30));
        let call = Call::encode_next_task();
        let not_posted = || panic!("runs only while a posted call is handled");
        assert_eq!(
            worker.call(&call, || false, not_posted).await,
            Outcome::UseService
        );
        assert_eq!(
            worker.call(&[0; 1025], || true, not_posted).await,
            Outcome::UseService
        );
        let mut request = Vec::new();
        let waited = coordinator
            .wait_request(0, Duration::from_millis(10), &mut request)
            .unwrap();
        assert_eq!(waited, Waited::TimedOut, "nothing was posted");
        coordinator.close();
        assert_eq!(
            worker.call(&call, || true, not_posted).await,
            Outcome::UseService
        );
    }

    /// A posted call is answered, or given up on (never re-sent): when the heartbeat fails
    /// meanwhile, when the mailbox closes, or at the timeout.
    #[tokio::test]
    async fn a_posted_call_is_answered_or_given_up() {
        let dir = tempfile::tempdir().unwrap();
        let (coordinator, mut worker) = pair(dir.path(), Duration::from_millis(300));
        let call = Call::encode_next_task();
        let server = std::thread::spawn(move || {
            let mut request = Vec::new();
            let waited = coordinator
                .wait_request(0, Duration::from_secs(5), &mut request)
                .unwrap();
            assert_eq!(waited, Waited::Ready(1));
            assert_eq!(Call::decode(&request), Ok(Call::NextTask));
            let answer = Answer::Error("gone".into());
            coordinator.reply(1, &answer.encode()).unwrap();
            coordinator
        });
        let ran = Cell::new(0);
        assert_eq!(
            worker.call(&call, || true, || ran.set(ran.get() + 1)).await,
            Outcome::Answered(Answer::Error("gone".into()))
        );
        assert_eq!(ran.get(), 1, "`meanwhile` runs once for a posted call");
        let coordinator = server.join().unwrap();

        // Alive when posted, then the heartbeat fails.
        let checks = Cell::new(0);
        let outcome = worker
            .call(
                &call,
                || {
                    checks.set(checks.get() + 1);
                    checks.get() == 1
                },
                || {},
            )
            .await;
        assert!(matches!(outcome, Outcome::GiveUp(ref why) if why.contains("heartbeats")));

        let started = Instant::now();
        let outcome = worker.call(&call, || true, || {}).await;
        assert!(matches!(outcome, Outcome::GiveUp(ref why) if why.contains("no answer")));
        assert!(started.elapsed() >= Duration::from_millis(300));

        drop(coordinator);

        // Closed while the worker waits (a long timeout: only the close can end this wait).
        let dir = tempfile::tempdir().unwrap();
        let (coordinator, mut worker) = pair(dir.path(), Duration::from_secs(30));
        let closing = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            coordinator.close();
        });
        let outcome = worker.call(&call, || true, || {}).await;
        assert!(matches!(outcome, Outcome::GiveUp(ref why) if why.contains("closed")));
        closing.join().unwrap();
    }
}

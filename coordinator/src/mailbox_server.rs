//! Answers a co-located worker's `NextTask` and `SubmitResult` calls through its mailbox
//! (`proto::mailbox`), on a thread of its own that sleeps on the mailbox's doorbell: the same
//! answers as the gRPC service's ([`Shared::next_task_blocking`], [`Shared::submit_result`]),
//! without HTTP/2 or a wake-up of the async runtime between the worker and the state machine
//! (docs/scaling.md §26). When a result completes its step, this thread also runs the step's
//! update (`crate::update`, docs/scaling.md §28). The thread never waits on the runtime; the run
//! closes and joins it before it ends ([`Shared::stop_mailboxes`]).
//!
//! The caller is the worker the mailbox was made for: the file is in the run's private
//! directory, made after that worker proved (with the probe) that it sees the directory, and
//! removed with the worker's gradient file when the worker is forgotten.

use std::sync::{Arc, Weak};
use std::time::Duration;

use proto::mailbox::{Answer, Call, Mailbox, Waited};

use crate::service::Shared;
use crate::state::WorkerId;
use crate::update::{self, TakenUpdate};

/// How often an idle server thread checks whether the run is still there.
const IDLE_CHECK: Duration = Duration::from_millis(500);

/// Makes `worker`'s mailbox and starts the thread that answers it; `false` (the worker keeps
/// calling the service) when the mailbox or the thread cannot be made.
pub fn start(shared: &Arc<Shared>, worker: WorkerId) -> bool {
    // A task with its parameters inline (every parameter file held by stragglers) must fit.
    let param_bytes = common::model::ParamLayout::new(&shared.run().model).len() * 4;
    let Ok(reply_capacity) = u32::try_from(param_bytes + (1 << 20)) else {
        return false;
    };
    let Some(mailbox) = shared.transport().create_mailbox(worker.0, reply_capacity) else {
        return false;
    };
    let run = Arc::downgrade(shared);
    let spawned = std::thread::Builder::new()
        .name(format!("mailbox-{:x}", worker.0))
        .spawn({
            let mailbox = Arc::clone(&mailbox);
            move || serve(&run, worker, &mailbox)
        });
    match spawned {
        Ok(thread) => {
            shared.adopt_mailbox_thread(thread);
            true
        }
        Err(e) => {
            tracing::warn!("no mailbox thread for worker {worker} ({e}): its calls use gRPC");
            mailbox.close();
            false
        }
    }
}

/// Answers requests until the mailbox is closed or the run (its `Shared`) is gone.
fn serve(run: &Weak<Shared>, worker: WorkerId, mailbox: &Mailbox) {
    // However this thread ends, a panic included, the worker's wait ends at once with it.
    struct CloseOnExit<'a>(&'a Mailbox);
    impl Drop for CloseOnExit<'_> {
        fn drop(&mut self) {
            self.0.close();
        }
    }
    let _close = CloseOnExit(mailbox);
    let mut answered = 0;
    let mut request = Vec::new();
    loop {
        let seq = match mailbox.wait_request(answered, IDLE_CHECK, &mut request) {
            Ok(Waited::Ready(seq)) => seq,
            Ok(Waited::TimedOut) if run.strong_count() > 0 => continue,
            Ok(Waited::TimedOut | Waited::Closed) => return,
            Err(e) => {
                tracing::warn!("worker {worker}'s mailbox failed ({e}): it stops");
                return;
            }
        };
        answered = seq;
        let Some(shared) = run.upgrade() else {
            return;
        };
        let (mut answer, update) = answer(&shared, worker, mailbox, &request);
        answer.drop_hint_beyond(mailbox.reply_capacity());
        let answered = match mailbox.reply(seq, &answer.encode()) {
            Ok(()) => true,
            Err(e) => {
                let error = Answer::Error(format!(
                    "the coordinator's answer did not fit the mailbox: {e}"
                ));
                mailbox.reply(seq, &error.encode()).is_ok()
            }
        };
        // A result that completed its step: its update runs here, now, while the worker posts
        // its next request, which this thread then answers without waiting to be woken. Run
        // even when the worker could not be answered: the run needs the step applied.
        if let Some(update) = update {
            update::apply_taken(&shared, update);
        }
        if !answered {
            return;
        }
    }
}

/// The service's answer to one request read from the mailbox, and the update of the step a
/// result completed, for this thread to run once it has answered.
fn answer(
    shared: &Shared,
    worker: WorkerId,
    mailbox: &Mailbox,
    request: &[u8],
) -> (Answer, Option<TakenUpdate>) {
    match Call::decode(request) {
        Ok(Call::NextTask) => match shared.next_task_blocking(worker, || mailbox.is_closed()) {
            Ok(reply) => (Answer::NextTask(reply.into()), None),
            Err(status) => (Answer::Error(status.message().to_string()), None),
        },
        Ok(Call::SubmitResult(request)) => {
            let (verdict, update) = shared.submit_result_taking_update(worker, request);
            (Answer::SubmitResult(verdict.into()), update)
        }
        Err(e) => (Answer::Error(e), None),
    }
}

//! Applying a complete step's update: the optimizer steps over the summed gradients, the new
//! parameters go where the workers read them, and the state machine takes them back and starts
//! the next step.
//!
//! Two threads may run it. The driver does, on a blocking thread, when it sees
//! [`Output::StepReady`](crate::state::Output::StepReady). But when a co-located worker's result
//! completes the step, its mailbox thread runs it at once, after answering the result and before
//! reading that worker's next request ([`apply_taken`]; it took the job under the lock it handed
//! the result in with, so the driver finds none). That spares the wake-up of the driver, then of
//! a blocking thread, then of the mailbox thread's own long poll (docs/scaling.md §28). The bits
//! are the same whoever runs it. The state machine holds updates back for the driver while it
//! needs the parameters where they are (a checkpoint, an epoch's end, a stop).

use std::panic::AssertUnwindSafe;
use std::time::Instant;

use crate::service::Shared;
use crate::state::UpdateJob;

/// Runs `job` on this thread (taken at `started`): the optimizer, the parameters published, the
/// state machine handed them back, and everyone waiting woken.
pub fn apply(shared: &Shared, job: UpdateJob, started: Instant) {
    tracing::trace!("step {}: update thread runs", job.global_step);
    let (step, len) = (job.global_step, job.param_len());
    // The new parameters go straight into the workers' parameter file as Adam makes them, or
    // into the bytes that tasks carry inline when no worker is attached.
    let mut done = shared.transport().publish_while(step + 1, len, |file| {
        let done = job.run(file);
        let made = done.outcome.is_ok();
        (done, made)
    });
    tracing::trace!("step {}: optimizer done and published", done.global_step);
    shared.transport().recycle(done.spent.drain(..));
    let step = done.global_step;
    let seconds = started.elapsed().as_secs_f64();
    shared.state().finish_update(done, seconds, Instant::now());
    shared.notify();
    tracing::trace!("step {step}: update handed back");
}

/// An update a mailbox thread took with the result that completed its step
/// ([`Shared::submit_result_taking_update`]), and when.
#[derive(Debug)]
pub struct TakenUpdate {
    pub job: UpdateJob,
    pub taken: Instant,
}

/// Runs an update taken on this thread. A panic is left for the driver, which ends the run with
/// it as it does when its own blocking thread panics (the job held the parameters: no checkpoint
/// of them can follow).
pub fn apply_taken(shared: &Shared, update: TakenUpdate) {
    let TakenUpdate { job, taken } = update;
    tracing::trace!("step {}: update starts", job.global_step);
    if let Err(panic) = std::panic::catch_unwind(AssertUnwindSafe(|| apply(shared, job, taken))) {
        let message = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "no message".into());
        shared.update_panicked(message);
    }
}

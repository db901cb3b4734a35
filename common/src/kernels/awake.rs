//! Keeping a compute pool's threads awake through one training step.
//!
//! A step is a few dozen short fork-join sections (each GEMM's pieces, each elementwise pass,
//! the tree's sums) with serial work between them. Between sections rayon's idle threads spin a
//! few microseconds, then sleep on a futex; on a virtual machine waking a sleeping vCPU costs tens
//! of microseconds. PyTorch's OpenMP threads instead spin for milliseconds (`KMP_BLOCKTIME`,
//! `GOMP_SPINCOUNT`). [`with_pool_awake`] does the same for one step: every other thread of the
//! pool runs a job that keeps taking the pool's work (`rayon::yield_now`) until the step ends.
//! Which thread computes a piece never changes what it computes (docs/design.md §2), so the bits
//! are the same either way.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};

/// Runs `work` (on a thread of a rayon pool) while the pool's other threads spin for its work
/// instead of sleeping between its parallel sections. Off a pool, or on a pool of one thread,
/// it just runs `work`. Only for pools that have their cores to themselves: a spinning thread
/// takes a core from whatever else would run there.
pub fn with_pool_awake<R>(work: impl FnOnce() -> R) -> R {
    let others = rayon::current_num_threads().saturating_sub(1);
    let Some(owner) = rayon::current_thread_index().filter(|_| others > 0) else {
        return work();
    };
    let done = AtomicBool::new(false);
    rayon::in_place_scope(|scope| {
        for _ in 0..others {
            scope.spawn(|_| spin_for_work(&done, owner));
        }
        // Set however `work` ends, a panic included, so the spinners (and the scope) end too.
        let _stop = StopOnDrop(&done);
        work()
    })
}

thread_local! {
    /// Whether this thread is already in [`spin_for_work`] further up its stack.
    static SPINNING: Cell<bool> = const { Cell::new(false) };
}

fn spin_for_work(done: &AtomicBool, owner: usize) {
    // The step's own thread takes a spinner only while waiting inside the step, which could then
    // never finish; a thread already spinning (it took a second spinner as work) needs no second.
    if rayon::current_thread_index() == Some(owner) || SPINNING.with(|s| s.replace(true)) {
        return;
    }
    while !done.load(Ordering::Acquire) {
        if rayon::yield_now() != Some(rayon::Yield::Executed) {
            std::hint::spin_loop();
        }
    }
    SPINNING.with(|s| s.set(false));
}

struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;

    /// The step's result, on pools of one to three threads and off any pool; a panic inside
    /// ends the spinners and reaches the caller.
    #[test]
    fn work_runs_once_with_the_pool_awake_and_panics_propagate() {
        let expected: u64 = (0..100_000u32)
            .map(|i| u64::from(i) * u64::from(i) % 7)
            .sum();
        for threads in 1..=3 {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            for _ in 0..20 {
                let got = pool.install(|| {
                    with_pool_awake(|| {
                        (0..100_000u32)
                            .into_par_iter()
                            .with_max_len(1000)
                            .map(|i| u64::from(i) * u64::from(i) % 7)
                            .sum::<u64>()
                    })
                });
                assert_eq!(got, expected, "{threads} threads");
            }
            let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                pool.install(|| with_pool_awake(|| panic!("inside the step")))
            }));
            assert!(panicked.is_err(), "{threads} threads");
            assert_eq!(pool.install(|| with_pool_awake(|| 5)), 5);
        }
        assert_eq!(with_pool_awake(|| 3), 3);
    }
}

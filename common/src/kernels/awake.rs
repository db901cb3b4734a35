//! Keeping a compute pool's threads awake through one training step.
//!
//! A step is a few dozen short fork-join sections (each GEMM's pieces, each elementwise pass,
//! the tree's sums) with serial work between them. Between sections rayon's idle threads spin a
//! few microseconds, then sleep on a futex; on a virtual machine waking a sleeping vCPU costs tens
//! of microseconds. PyTorch's OpenMP threads instead spin for milliseconds (`KMP_BLOCKTIME`,
//! `GOMP_SPINCOUNT`). [`with_pool_awake`] does the same for one step: every other thread of the
//! pool runs a job that keeps taking the pool's work (`rayon::yield_now`) until the step ends,
//! or until it has found none for 5 ms.
//! Which thread computes a piece never changes what it computes (docs/design.md §2), so the bits
//! are the same either way.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Runs `work` (on a thread of a rayon pool) while the pool's other threads spin for its work
/// instead of sleeping between its parallel sections. Off a pool, or on a pool of one thread,
/// it just runs `work`. Only for pools that have their cores to themselves: a spinning thread
/// takes a core from whatever else would run there.
pub fn with_pool_awake<R>(work: impl FnOnce() -> R) -> R {
    let Some(owner) = rayon::current_thread_index().filter(|_| rayon::current_num_threads() > 1)
    else {
        return work();
    };
    let done = AtomicBool::new(false);
    rayon::in_place_scope(|scope| {
        // A broadcast job runs on each thread of the pool, that thread's own: no thread takes
        // another's spinner, so every other thread spins.
        scope.spawn_broadcast(|_, thread| spin_for_work(&done, thread.index() == owner));
        // Set however `work` ends, a panic included, so the spinners (and the scope) end too.
        let _stop = SetOnDrop(&done);
        work()
    })
}

thread_local! {
    /// Whether this thread is already in [`spin_for_work`] further up its stack.
    static SPINNING: Cell<bool> = const { Cell::new(false) };
}

#[cfg(test)]
thread_local! {
    /// Spinners that stopped for want of work, per thread (a test checks where one did).
    static IDLE_RETURNS: Cell<u32> = const { Cell::new(0) };
}

/// Spinners that started spinning (tests check that each other thread does).
#[cfg(test)]
static SPINNERS_STARTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// How long a spinner may find no work before it stops for the rest of the step (its thread then
/// sleeps between sections, as rayon's threads do). Rayon may run a spinner inside its thread's
/// wait for a join half another thread stole; that wait cannot end before the spinner returns,
/// and the step may need it to. A spinner that stopped only at the step's end hung `worker bench`
/// (docs/scaling.md §23); this bounds such a stall to 5 ms after the pool runs out of other work.
/// 5 ms is far longer than the gaps between a step's parallel sections; a serial stretch longer
/// than that costs the rest of the step its spinning, not its result.
const IDLE_LIMIT: Duration = Duration::from_millis(5);

fn spin_for_work(done: &AtomicBool, on_owner: bool) {
    // The step's own thread runs its copy only while waiting inside the step, which could then
    // never finish; a thread already spinning (a nested step) needs no second spinner.
    if on_owner || SPINNING.with(|s| s.replace(true)) {
        return;
    }
    let _reset = ResetSpinning;
    #[cfg(test)]
    SPINNERS_STARTED.fetch_add(1, Ordering::SeqCst);
    // Idle rounds since the last job; the clock is read every 64th (a read costs more than a
    // round of looking for work).
    let mut idle_rounds = 0u32;
    let mut idle_since = Instant::now();
    while !done.load(Ordering::Acquire) {
        if rayon::yield_now() == Some(rayon::Yield::Executed) {
            idle_rounds = 0;
            continue;
        }
        if idle_rounds.is_multiple_of(64) {
            let now = Instant::now();
            if idle_rounds == 0 {
                idle_since = now;
            } else if now - idle_since > IDLE_LIMIT {
                #[cfg(test)]
                IDLE_RETURNS.with(|n| n.set(n.get() + 1));
                return;
            }
        }
        idle_rounds = idle_rounds.wrapping_add(1);
        std::hint::spin_loop();
    }
}

struct SetOnDrop<'a>(&'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

struct ResetSpinning;

impl Drop for ResetSpinning {
    fn drop(&mut self) {
        SPINNING.with(|s| s.set(false));
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use rayon::prelude::*;

    use super::*;

    fn sum_of_squares_mod_7() -> u64 {
        (0..100_000u32)
            .into_par_iter()
            .with_max_len(1000)
            .map(|i| u64::from(i) * u64::from(i) % 7)
            .sum()
    }

    /// A step that first waits (up to 10 s) until `others` spinners have started.
    fn step_seeing_spinners(others: usize) -> (u64, bool) {
        let before = SPINNERS_STARTED.load(Ordering::SeqCst);
        with_pool_awake(|| {
            let deadline = Instant::now() + Duration::from_secs(10);
            while SPINNERS_STARTED.load(Ordering::SeqCst) < before + others
                && Instant::now() < deadline
            {
                std::hint::spin_loop();
            }
            let seen = SPINNERS_STARTED.load(Ordering::SeqCst) >= before + others;
            (sum_of_squares_mod_7(), seen)
        })
    }

    /// Spins until `flag` is set or `limit` passes; whether it was set.
    fn wait_for(flag: &AtomicBool, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while !flag.load(Ordering::SeqCst) {
            if Instant::now() > deadline {
                return false;
            }
            std::hint::spin_loop();
        }
        true
    }

    /// The hang this module once had, made to happen: thread B runs a job X that the step needs;
    /// X's join waits for its other half, which the step's thread A took; rayon runs B's
    /// spinner inside that wait. A spinner that only stopped at the step's end never let X finish.
    #[test]
    fn a_spinner_run_inside_a_wait_lets_the_wait_end() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let limit = Duration::from_secs(5);
        let (x_started, half_taken, x_done) = (
            AtomicBool::new(false),
            AtomicBool::new(false),
            AtomicBool::new(false),
        );
        let (step_saw_x_finish, ()) = pool.install(|| {
            rayon::join(
                || {
                    // A, once B has taken X: the step.
                    assert!(wait_for(&x_started, limit), "the other thread never took X");
                    with_pool_awake(|| {
                        // Take the other half of X's join from B's deque (rayon steals it; the
                        // first `yield_now` runs A's own spinner, which returns at once).
                        let deadline = Instant::now() + limit;
                        while !half_taken.load(Ordering::SeqCst) && Instant::now() < deadline {
                            rayon::yield_now();
                        }
                        wait_for(&x_done, limit)
                    })
                },
                || {
                    // X, on B.
                    x_started.store(true, Ordering::SeqCst);
                    let idle_returns = IDLE_RETURNS.with(Cell::get);
                    rayon::join(
                        || assert!(wait_for(&half_taken, limit), "A never took the half"),
                        || {
                            // On A: held while B waits for it (and runs its spinner).
                            half_taken.store(true, Ordering::SeqCst);
                            std::thread::sleep(Duration::from_millis(50));
                        },
                    );
                    // The hang was set up: B's spinner ran inside X's wait, and stopped.
                    assert!(
                        IDLE_RETURNS.with(Cell::get) > idle_returns,
                        "B's spinner did not stop for want of work inside X's wait (it held X until the step \
                         ended, or it never ran there and the test proved nothing)"
                    );
                    x_done.store(true, Ordering::SeqCst);
                },
            )
        });
        assert!(
            step_saw_x_finish,
            "X stayed stuck under its thread's spinner"
        );
    }

    /// Every other thread of the pool spins through the step, which gives its result, whether
    /// entered by `install`, `spawn` or from inside a join; nested calls and calls off a pool
    /// just run; a panic inside ends the spinners and reaches the caller.
    #[test]
    fn the_other_threads_spin_through_a_step_and_stop_after_it() {
        let expected: u64 = (0..100_000u64).map(|i| i * i % 7).sum();
        for threads in 1..=3 {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            for _ in 0..10 {
                let (got, seen) = pool.install(|| step_seeing_spinners(threads - 1));
                assert_eq!(got, expected, "{threads} threads");
                assert!(seen, "{threads} threads: not every other thread spun");
            }
            let (tx, rx) = std::sync::mpsc::channel();
            pool.spawn(move || tx.send(step_seeing_spinners(threads - 1)).unwrap());
            assert_eq!(
                rx.recv().unwrap(),
                (expected, true),
                "spawned, {threads} threads"
            );
            let (joined, _) =
                pool.install(|| rayon::join(|| with_pool_awake(sum_of_squares_mod_7), || 1));
            assert_eq!(joined, expected, "inside a join, {threads} threads");
            let nested = pool.install(|| with_pool_awake(|| with_pool_awake(sum_of_squares_mod_7)));
            assert_eq!(nested, expected, "nested, {threads} threads");
            let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                pool.install(|| with_pool_awake(|| panic!("inside the step")))
            }));
            assert!(panicked.is_err(), "{threads} threads");
            assert_eq!(
                pool.install(|| step_seeing_spinners(threads - 1)),
                (expected, true)
            );
        }
        assert_eq!(with_pool_awake(|| 3), 3);
    }
}

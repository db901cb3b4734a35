//! CPU time of a computation, so a worker reports time spent computing rather than wall time that
//! includes waiting for a core (several workers can share one machine's cores).
//!
//! The process's CPU clock (`CLOCK_PROCESS_CPUTIME_ID`) is read before and after the computation:
//! one system call each, where reading every pool thread's own clock took a broadcast that woke
//! the whole pool twice a step. While a task computes, the worker's other threads only await it
//! (heartbeats aside, microseconds every half second), so the process's CPU time is the pool's.
//! Threads kept spinning through the step (`--idle-threads spin`, the default, meant for a worker
//! with its cores to itself) count while they spin: the figure is then the computation's wall
//! time on those cores, which is what it takes there; threads that sleep (`sleep`, for workers
//! sharing cores) count only as they work.

use std::time::Instant;

use rustix::time::{ClockId, clock_gettime};

/// Nanoseconds of CPU time the whole process has used.
fn process_cpu_ns() -> u64 {
    let t = clock_gettime(ClockId::ProcessCPUTime);
    (t.tv_sec as u64).saturating_mul(1_000_000_000) + t.tv_nsec as u64
}

/// Started before a computation on a pool of `threads` threads, read after it.
#[derive(Debug)]
pub struct ComputeClock {
    cpu_ns: u64,
    wall: Instant,
    threads: usize,
}

impl ComputeClock {
    pub fn start(threads: usize) -> Self {
        ComputeClock {
            cpu_ns: process_cpu_ns(),
            wall: Instant::now(),
            threads: threads.max(1),
        }
    }

    /// CPU seconds spent since `start`, divided by the pool's threads: the time the computation
    /// would take with its cores to itself. Never more than the wall time.
    pub fn seconds(&self) -> f64 {
        let wall = self.wall.elapsed().as_secs_f64();
        let cpu = process_cpu_ns().saturating_sub(self.cpu_ns) as f64 * 1e-9;
        (cpu / self.threads as f64).min(wall)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_threads_count_and_sleeping_ones_do_not() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let clock = ComputeClock::start(2);
        std::thread::sleep(std::time::Duration::from_millis(50));
        let idle = clock.seconds();
        assert!(idle < 0.02, "sleeping is not computing: {idle}");
        let clock = ComputeClock::start(2);
        pool.install(|| {
            rayon::broadcast(|_| {
                // Spin until this thread has *run* 50 ms, however busy the machine is: the test
                // checks the accounting, not the scheduler.
                let thread_ns = || {
                    let t = clock_gettime(ClockId::ThreadCPUTime);
                    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
                };
                let start = thread_ns();
                let mut x = 0u64;
                while thread_ns() - start < 50_000_000 {
                    for _ in 0..10_000 {
                        x = x.wrapping_mul(31).wrapping_add(1);
                    }
                    std::hint::black_box(x);
                }
            })
        });
        // Each thread ran 50 ms, so the wall time was at least that; other threads of the test
        // process can only add.
        let busy = clock.seconds();
        assert!(busy >= 0.045, "two threads that each ran 50 ms: {busy}");
    }
}

//! CPU time of a rayon pool's threads, so a worker reports time spent computing rather than
//! wall time that includes waiting for a core (several workers can share one machine's cores).
//!
//! Each thread's own run time comes from `/proc/thread-self/schedstat` (nanoseconds on the CPU,
//! Linux). Where it cannot be read, wall time is reported instead.

use std::time::Instant;

/// Nanoseconds the calling thread has run, if the kernel tells.
fn thread_cpu_ns() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    text.split_whitespace().next()?.parse().ok()
}

/// The summed CPU time of every thread of `pool` (one read on each thread).
fn pool_cpu_ns(pool: &rayon::ThreadPool) -> Option<u64> {
    pool.broadcast(|_| thread_cpu_ns()).into_iter().sum()
}

/// Started before a computation on the pool, read after it.
#[derive(Debug)]
pub struct PoolClock {
    cpu_ns: Option<u64>,
    wall: Instant,
}

impl PoolClock {
    pub fn start(pool: &rayon::ThreadPool) -> Self {
        PoolClock {
            cpu_ns: pool_cpu_ns(pool),
            wall: Instant::now(),
        }
    }

    /// CPU seconds the pool's threads spent since `start`, divided by their number: the time the
    /// computation would take with its cores to itself. Never more than the wall time.
    pub fn seconds(&self, pool: &rayon::ThreadPool) -> f64 {
        let wall = self.wall.elapsed().as_secs_f64();
        match (self.cpu_ns, pool_cpu_ns(pool)) {
            (Some(before), Some(after)) => {
                let cpu = after.saturating_sub(before) as f64 * 1e-9;
                (cpu / pool.current_num_threads() as f64).min(wall)
            }
            _ => wall,
        }
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
        let clock = PoolClock::start(&pool);
        std::thread::sleep(std::time::Duration::from_millis(50));
        let idle = clock.seconds(&pool);
        assert!(idle < 0.02, "sleeping is not computing: {idle}");
        if thread_cpu_ns().is_none() {
            return; // no schedstat here: wall time is reported, nothing to check
        }
        let clock = PoolClock::start(&pool);
        pool.install(|| {
            rayon::broadcast(|_| {
                // Spin until this thread has *run* 50 ms, however busy the machine is: the test
                // checks the accounting, not the scheduler.
                let start = thread_cpu_ns().unwrap();
                let mut x = 0u64;
                while thread_cpu_ns().unwrap() - start < 50_000_000 {
                    for _ in 0..10_000 {
                        x = x.wrapping_mul(31).wrapping_add(1);
                    }
                    std::hint::black_box(x);
                }
            })
        });
        let busy = clock.seconds(&pool);
        assert!(busy >= 0.045, "two threads that each ran 50 ms: {busy}");
    }
}

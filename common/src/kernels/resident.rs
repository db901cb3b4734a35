//! Zeroed buffers whose pages are mapped now, not on first use.
//!
//! `vec![0.0; n]` asks the allocator for zeroed memory, which for large buffers is fresh pages
//! the kernel maps lazily: the first read of each 4 KiB maps the shared zero page and the first
//! write copies it, two faults a page. For a buffer written every training step (the optimizer's
//! moments, the coordinator's gradient buffers) the first step paid them all, milliseconds of
//! step 0 on a VM (docs/scaling.md §24). Writing the zeros once where the buffer is made moves
//! that cost to the run's setup.

/// `n` zeros, every page already written.
pub fn resident_zeros(n: usize) -> Vec<f32> {
    let mut values = vec![0.0f32; n];
    // Opaque to the optimiser, so the writes are not dropped as storing what calloc gave.
    std::hint::black_box(values.as_mut_slice()).fill(0.0);
    values
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resident_zeros_are_zeros() {
        for n in [0, 1, 1023, 1 << 20] {
            let values = resident_zeros(n);
            assert_eq!(values.len(), n);
            assert!(values.iter().all(|v| v.to_bits() == 0));
        }
    }
}

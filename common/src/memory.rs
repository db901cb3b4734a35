//! Zeroed buffers whose pages are mapped now, not on first use.
//!
//! `vec![0.0; n]` asks the allocator for zeroed memory, which for large buffers is fresh pages
//! the kernel maps lazily, a page fault at a time. For a buffer used every training step the first
//! step pays them all. Adam's moments, read then written, take two faults a page (a read maps the
//! shared zero page, the write copies it): with the optimizer's pool starting and the parameter
//! file's first write, they made step 0's Adam take 10 ms instead of 0.4 on a 2-core VM
//! (docs/scaling.md §24). Writing the zeros where the buffer is made moves that cost to the run's
//! setup.

/// `n` zeros, every page already written.
pub fn resident_zeros(n: usize) -> Vec<f32> {
    let mut values = vec![0.0f32; n];
    // Opaque to the compiler, which would otherwise drop the writes as storing what the zeroed
    // allocation already holds (`black_box` promises this only in practice, which is all a
    // speed-up needs: the values are zeros either way).
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

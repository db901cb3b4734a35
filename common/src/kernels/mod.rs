//! The deterministic arithmetic everything else runs on: the floating-point types ([`Float`]:
//! f32 for training, f64 for gradient checks), the GEMMs and column sums ([`gemm`],
//! [`colsum_into`]), the elementwise kernels beside them (bias and activation, the ReLU
//! backward step [`relu_mask`], fixed-lane row sums, [`add_assign`]), and the step's large
//! copies ([`copy_values`]). Work is split at boundaries computed from the shapes alone and no
//! sum is ever reordered, so every result is a pure function of its inputs' shapes and values,
//! never of the thread count (docs/design.md §2).

mod awake;
mod copy;
mod elementwise;
#[cfg(target_arch = "x86_64")]
mod gemm_avx2;
#[cfg(target_arch = "x86_64")]
mod gemm_avx512;
#[cfg(target_arch = "x86_64")]
mod gemm_layout;
mod linalg;
mod scalar;
mod tree_gemm;
#[cfg(target_arch = "x86_64")]
mod tree_tile_avx512;
mod vector_isa;

pub use awake::with_pool_awake;
#[cfg(test)]
pub(crate) use copy::OUTLIERS;
pub use copy::copy_values;
pub use elementwise::{add_assign, relu_mask};
pub use linalg::{colsum_into, gemm};
pub use scalar::{Float, exp_nonpositive_f32, ln_1p_unit_f32};
pub use tree_gemm::{TreeProgram, tree_weight_grad};

pub(crate) use copy::{add_measuring, copy_measuring, fill_measuring, magnitude_bits};
pub(crate) use elementwise::{add_bias_act, for_row_pieces, output_row, sized};
pub(crate) use linalg::{view, view_mut};
#[cfg(test)]
pub(crate) use vector_isa::on_every_path;
pub(crate) use vector_isa::with_widest_vectors;

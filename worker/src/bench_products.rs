//! `worker bench --products`: every product of a training step timed on its own, the engine's
//! kernels against one call of `matrixmultiply` (through ndarray's `general_mat_mul`), the crate
//! the engine used before it had kernels of its own and still uses where they decline.
//!
//! Why: kernel changes were measured with throwaway timing programs (docs/scaling.md §22, §29,
//! §30, §35), so each session wrote its own and the figures could not be reproduced. This runs the
//! step's products with their exact shapes and operand layouts, as `gemm_times` in `bench.rs`
//! replays them, one product at a time. The engine's products run on the bench's pool (split into
//! pieces over its threads); `matrixmultiply`'s is one call on one thread, so the two columns
//! compare kernels only with `--threads 1`.

use std::time::{Duration, Instant};

use common::kernels::{TreeProgram, gemm, tree_weight_grad};
use common::model::{LayerRole, LinearLayout, ParamLayout, Vae};
use common::train::ReductionTree;
use ndarray::linalg::general_mat_mul;
use ndarray::{ArrayView2, ArrayViewMut2};

/// Calls of each product timed (after one untimed call); the fastest is reported.
pub const PRODUCT_REPS: usize = 100;

/// One product of a step, timed both ways.
#[derive(Debug, Clone)]
pub struct ProductTime {
    /// The layer's name and the product (`fc1: x W^T`).
    pub name: String,
    /// `m x k x n`: rows of the result, the summed dimension, columns of the result.
    pub shape: [usize; 3],
    /// The engine's kernel, fastest of [`PRODUCT_REPS`].
    pub ours: Duration,
    /// One `matrixmultiply` call of the same product. For a weight gradient that is one sum over
    /// all rows, without the shards' partial sums, which favours it when there are several.
    pub matrixmultiply: Duration,
}

/// One layer of a step as its products see it.
pub(crate) struct StepLayer<'a> {
    pub layer: &'a LinearLayout,
    /// Rows per shard: one per example in the encoder, one per sample in the decoder.
    pub per_shard: usize,
    /// Rows over all shards.
    pub rows: usize,
    /// Whether the layer's input is the data, so that the step needs no `delta W` for it.
    pub fed_by_data: bool,
}

impl StepLayer<'_> {
    /// The program of the layer's weight gradient over `tree`'s leaves.
    pub(crate) fn program(&self, tree: &ReductionTree) -> TreeProgram {
        let per = self.per_shard;
        TreeProgram::new(tree.root(), |leaf| {
            leaf.lo as usize * per..leaf.hi as usize * per
        })
    }
}

/// The layers of a step of `shards` shards of `per_shard` examples with `k` samples each.
pub(crate) fn step_layers(
    layout: &ParamLayout,
    per_shard: usize,
    k: usize,
    shards: usize,
) -> Vec<StepLayer<'_>> {
    let no_encoder_hidden = layout.encoder_hidden().next().is_none();
    layout
        .layers()
        .iter()
        .map(|layer| {
            let per = match layer.role {
                LayerRole::EncoderHidden(_) | LayerRole::Mu | LayerRole::LogVar => per_shard,
                LayerRole::DecoderHidden(_) | LayerRole::DecoderOut => per_shard * k,
            };
            let fed_by_data = matches!(layer.role, LayerRole::EncoderHidden(0))
                || (no_encoder_hidden && matches!(layer.role, LayerRole::Mu | LayerRole::LogVar));
            StepLayer {
                layer,
                per_shard: per,
                rows: shards * per,
                fed_by_data,
            }
        })
        .collect()
}

/// The most values any layer's input or output holds over all rows.
pub(crate) fn widest(layers: &[StepLayer<'_>]) -> usize {
    layers
        .iter()
        .map(|l| l.rows * l.layer.in_dim.max(l.layer.out_dim))
        .max()
        .unwrap_or(0)
}

/// Times each layer's three products (forward `x W^T`, the weight gradient `delta^T x` summed
/// over `shards` shards along the reduction tree, and `delta W` for layers not fed by the data)
/// for `shards` shards of `per_shard` examples with `k` samples, on the current rayon pool. (The
/// engine adds the log-variance layer's `delta W` into the mean layer's, `beta` 1; here every
/// product overwrites its output, `beta` 0.)
pub fn time_products(
    vae: &Vae,
    params: &[f32],
    per_shard: usize,
    k: usize,
    shards: usize,
) -> Vec<ProductTime> {
    let layout = vae.layout();
    let layers = step_layers(layout, per_shard, k, shards);
    let widest = widest(&layers);
    // Values of both signs and many exponents, none subnormal (which would time the FPU's
    // slow path, not the kernel).
    let values = |salt: usize| -> Vec<f32> {
        (0..widest)
            .map(|i| (((i * 7919 + salt * 104_729) % 2003) as f32 - 1001.0) / 317.0)
            .collect()
    };
    let (input, delta) = (values(1), values(2));
    let largest_weight = layout.layers().iter().map(|l| l.weight.len()).max();
    let len = widest.max(largest_weight.unwrap_or(0));
    // Separate outputs, so that the two ways' calls can alternate.
    let (mut out, mut reference) = (vec![0.0f32; len], vec![0.0f32; len]);
    let tree = ReductionTree::new(shards);
    let mut times = Vec::new();
    for step_layer in &layers {
        let (l, all) = (step_layer.layer, step_layer.rows);
        let (i, o) = (l.in_dim, l.out_dim);
        let w = ArrayView2::from_shape((o, i), &params[l.weight.clone()]).expect("weight");
        let x = ArrayView2::from_shape((all, i), &input[..all * i]).expect("input");
        let d = ArrayView2::from_shape((all, o), &delta[..all * o]).expect("delta");

        let (ours, matrixmultiply) = fastest_each(
            || {
                let c = ArrayViewMut2::from_shape((all, o), &mut out[..all * o]).expect("c");
                gemm(1.0, x, w.t(), 0.0, c);
            },
            || {
                let mut c =
                    ArrayViewMut2::from_shape((all, o), &mut reference[..all * o]).expect("c");
                general_mat_mul(1.0, &x, &w.t(), 0.0, &mut c);
            },
        );
        times.push(ProductTime {
            name: format!("{}: x W^T", l.name),
            shape: [all, i, o],
            ours,
            matrixmultiply,
        });

        let program = step_layer.program(&tree);
        let (ours, matrixmultiply) = fastest_each(
            || tree_weight_grad(&program, &delta, o, &input, i, i, &mut out[..o * i]),
            || {
                let mut c = ArrayViewMut2::from_shape((o, i), &mut reference[..o * i]).expect("dW");
                general_mat_mul(1.0, &d.t(), &x, 0.0, &mut c);
            },
        );
        times.push(ProductTime {
            name: format!(
                "{}: delta^T x, {shards} shard{}",
                l.name,
                if shards == 1 { "" } else { "s" }
            ),
            shape: [o, all, i],
            ours,
            matrixmultiply,
        });

        if !step_layer.fed_by_data {
            let (ours, matrixmultiply) = fastest_each(
                || {
                    let c = ArrayViewMut2::from_shape((all, i), &mut out[..all * i]).expect("c");
                    gemm(1.0, d, w, 0.0, c);
                },
                || {
                    let mut c =
                        ArrayViewMut2::from_shape((all, i), &mut reference[..all * i]).expect("c");
                    general_mat_mul(1.0, &d, &w, 0.0, &mut c);
                },
            );
            times.push(ProductTime {
                name: format!("{}: delta W", l.name),
                shape: [all, o, i],
                ours,
                matrixmultiply,
            });
        }
    }
    times
}

/// The fastest of [`PRODUCT_REPS`] timed calls of `ours` and of `reference`, the calls
/// alternating (after one untimed call of each), so that a slow spell of a noisy machine hits
/// both alike.
fn fastest_each(mut ours: impl FnMut(), mut reference: impl FnMut()) -> (Duration, Duration) {
    let time = |f: &mut dyn FnMut()| {
        let t = Instant::now();
        f();
        t.elapsed()
    };
    ours();
    reference();
    (0..PRODUCT_REPS)
        .map(|_| (time(&mut ours), time(&mut reference)))
        .fold((Duration::MAX, Duration::MAX), |(a, b), (x, y)| {
            (a.min(x), b.min(y))
        })
}

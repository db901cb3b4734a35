//! Optimizers as pure step functions with explicit state (burn's optimizer style).
//!
//! Parameters, gradients and moment buffers are flat `[f32]` vectors laid out as
//! [`crate::model::ParamLayout`], so one step is a handful of elementwise passes and the state is
//! a step counter plus named vectors that a checkpoint stores as they are.
//!
//! The arithmetic follows PyTorch's single-tensor (non-foreach) CPU path of `torch.optim.Adam` /
//! `AdamW` and `torch.optim.SGD`: per-element operations in f32, in PyTorch's operation order, with
//! scalars such as the bias-corrected step size computed in f64 and cast to f32 once. PyTorch's
//! vectorised kernels may fuse a multiply-add where we round twice, so results agree to a few ulp,
//! not bit for bit. One departure of ours: optimizer state below [`MOMENT_FLOOR`] is stored as
//! zero (`adam`'s module doc says why and what it changes). Ours are deterministic: every
//! operation is elementwise, so splitting the vector across threads (in fixed chunks) cannot
//! change a bit.
//!
//! ```
//! use common::optim::OptimizerConfig;
//! let adam = OptimizerConfig::adam(1e-3);
//! let mut params = vec![1.0_f32, -2.0];
//! let mut state = adam.init_state(params.len());
//! adam.step(&mut params, &[0.5, -0.25], &mut state).unwrap();
//! // Bias correction makes Adam's first step ~ lr * sign(g).
//! assert!((params[0] - (1.0 - 1e-3)).abs() < 1e-6);
//! assert!((params[1] - (-2.0 + 1e-3)).abs() < 1e-6);
//! assert_eq!(state.step, 1);
//! ```

mod adam;
mod clip;
mod gradient_blocks;
mod sgd;
mod state;

pub use clip::{Clipped, clip_grad_norm, fill_measuring_norm};
pub use gradient_blocks::GradientBlocks;
pub use state::{Moments, OptimizerState};

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Elements per parallel work item. Fixed, so the split is the same for any thread count (it only
/// matters for speed: every operation is elementwise). 16 Ki f32 = 64 KiB per vector, small enough
/// that the 650k-parameter default model spreads over ~40 items.
const CHUNK: usize = 1 << 14;

/// Below this many elements one thread does the whole vector: splitting costs more than it saves.
const PARALLEL_MIN: usize = 1 << 16;

/// The smallest optimizer-state magnitude stored (Adam's moments, SGD's momentum buffer);
/// smaller values become zero, so a state that decays (its gradient staying zero) reaches zero
/// instead of sticking in f32's subnormal range, which costs a microcode assist per vector
/// instruction on Intel CPUs (`adam`'s module doc; docs/scaling.md §27).
const MOMENT_FLOOR: f32 = f32::MIN_POSITIVE * (1u64 << 30) as f32;

/// `x`, or zero if `|x|` is below [`MOMENT_FLOOR`] (NaN stays NaN). A compare and a blend per
/// vector: free beside Adam's divisions.
#[inline(always)]
fn flush_tiny(x: f32) -> f32 {
    if x.abs() < MOMENT_FLOOR { 0.0 } else { x }
}

/// Which optimizer, and its hyper-parameters. Serialised as `{"kind": "adam", "lr": ..., ...}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum OptimizerConfig {
    /// Adam (Kingma & Ba), with PyTorch's bias correction. `weight_decay` is decoupled, as in
    /// `torch.optim.AdamW` (`p *= 1 - lr * wd` before the Adam update); 0 gives plain Adam.
    Adam {
        lr: f64,
        beta1: f64,
        beta2: f64,
        eps: f64,
        weight_decay: f64,
    },
    /// Stochastic gradient descent with optional (Nesterov) momentum, as `torch.optim.SGD`.
    /// `weight_decay` is coupled (`g += wd * p`), as in PyTorch's SGD.
    Sgd {
        lr: f64,
        momentum: f64,
        dampening: f64,
        nesterov: bool,
        weight_decay: f64,
    },
}

impl Default for OptimizerConfig {
    /// Adam with PyTorch's defaults: lr 1e-3, betas (0.9, 0.999), eps 1e-8, no weight decay.
    fn default() -> Self {
        OptimizerConfig::adam(1e-3)
    }
}

impl OptimizerConfig {
    /// Adam with PyTorch's default betas (0.9, 0.999), eps 1e-8 and no weight decay.
    pub fn adam(lr: f64) -> Self {
        OptimizerConfig::Adam {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }

    /// SGD with (non-Nesterov, undampened) momentum; `momentum = 0` is plain SGD.
    pub fn sgd(lr: f64, momentum: f64) -> Self {
        OptimizerConfig::Sgd {
            lr,
            momentum,
            dampening: 0.0,
            nesterov: false,
            weight_decay: 0.0,
        }
    }

    /// `adam` or `sgd`, as on the command line.
    pub fn name(&self) -> &'static str {
        match self {
            OptimizerConfig::Adam { .. } => "adam",
            OptimizerConfig::Sgd { .. } => "sgd",
        }
    }

    /// The learning rate.
    pub fn lr(&self) -> f64 {
        match *self {
            OptimizerConfig::Adam { lr, .. } | OptimizerConfig::Sgd { lr, .. } => lr,
        }
    }

    /// Checks the ranges PyTorch checks, and that every number is finite.
    pub fn validate(&self) -> Result<()> {
        fn non_negative(name: &str, value: f64) -> Result<()> {
            if value.is_finite() && value >= 0.0 {
                Ok(())
            } else {
                Err(Error::Config(format!(
                    "optimizer {name} must be a finite number >= 0, got {value}"
                )))
            }
        }
        match *self {
            OptimizerConfig::Adam {
                lr,
                beta1,
                beta2,
                eps,
                weight_decay,
            } => {
                non_negative("learning rate", lr)?;
                non_negative("eps", eps)?;
                non_negative("weight decay", weight_decay)?;
                for (name, beta) in [("beta1", beta1), ("beta2", beta2)] {
                    if !(0.0..1.0).contains(&beta) {
                        return Err(Error::Config(format!(
                            "Adam {name} must be in [0, 1), got {beta}"
                        )));
                    }
                }
            }
            OptimizerConfig::Sgd {
                lr,
                momentum,
                dampening,
                nesterov,
                weight_decay,
            } => {
                non_negative("learning rate", lr)?;
                non_negative("momentum", momentum)?;
                non_negative("weight decay", weight_decay)?;
                if !dampening.is_finite() {
                    return Err(Error::Config(format!(
                        "SGD dampening must be finite, got {dampening}"
                    )));
                }
                if nesterov && (momentum <= 0.0 || dampening != 0.0) {
                    return Err(Error::Config(format!(
                        "Nesterov momentum needs momentum > 0 and dampening = 0, got momentum \
                         {momentum} and dampening {dampening}"
                    )));
                }
            }
        }
        Ok(())
    }

    /// The state before the first step: step 0, Adam's moments zero. SGD's momentum buffer does
    /// not exist until the first step sets it to the gradient (as in PyTorch). The moments' pages
    /// are mapped here, not in the first step.
    pub fn init_state(&self, n_params: usize) -> OptimizerState {
        let moments = match self {
            OptimizerConfig::Adam { .. } => Moments::Adam {
                exp_avg: crate::memory::resident_zeros(n_params),
                exp_avg_sq: crate::memory::resident_zeros(n_params),
            },
            OptimizerConfig::Sgd { .. } => Moments::Sgd {
                momentum_buffer: None,
            },
        };
        OptimizerState { step: 0, moments }
    }

    /// One optimizer step: updates `params` in place from `grad` (the gradient of the loss to
    /// minimise), advancing `state`. Fails, changing nothing, if the lengths of `params`, `grad`
    /// and the state's buffers differ or the state belongs to the other optimizer.
    pub fn step(&self, params: &mut [f32], grad: &[f32], state: &mut OptimizerState) -> Result<()> {
        self.step_scaled(params, grad, 1.0, state)
    }

    /// [`Self::step`] for the gradient `grad / divisor`, with the division done value by value
    /// inside the step's single pass: the same bits as dividing first, one pass over memory less
    /// (the coordinator's mean over a step's examples).
    pub fn step_scaled(
        &self,
        params: &mut [f32],
        grad: &[f32],
        divisor: f32,
        state: &mut OptimizerState,
    ) -> Result<()> {
        if params.len() != grad.len() {
            return Err(Error::Tensor(format!(
                "optimizer step: {} parameters but {} gradient entries",
                params.len(),
                grad.len()
            )));
        }
        state.check(self, params.len())?;
        let step = state.step + 1;
        match (self, &mut state.moments) {
            (
                OptimizerConfig::Adam {
                    lr,
                    beta1,
                    beta2,
                    eps,
                    weight_decay,
                },
                Moments::Adam {
                    exp_avg,
                    exp_avg_sq,
                },
            ) => {
                let scalars = adam::Scalars::new(*lr, *beta1, *beta2, *eps, *weight_decay, step)
                    .with_divisor(divisor);
                adam::step(&scalars, params, grad, exp_avg, exp_avg_sq);
            }
            (
                OptimizerConfig::Sgd {
                    lr,
                    momentum,
                    dampening,
                    nesterov,
                    weight_decay,
                },
                Moments::Sgd { momentum_buffer },
            ) => {
                let scalars =
                    sgd::Scalars::new(*lr, *momentum, *dampening, *nesterov, *weight_decay)
                        .with_divisor(divisor);
                sgd::step(&scalars, params, grad, momentum_buffer);
            }
            _ => unreachable!("OptimizerState::check rejects a state of the other optimizer"),
        }
        state.step = step;
        Ok(())
    }

    /// [`Self::step_scaled`] for a gradient of `params.len()` values read block by block
    /// ([`GradientBlocks`]). Adam asks for each block just before stepping it, so a gradient
    /// summed on the fly is read once and stays in cache; SGD gets the whole gradient first. The
    /// same bits as `step_scaled` on the same gradient.
    ///
    /// With a `mirror` (as long as `params`), the new parameters are also written there: by Adam
    /// from the registers it stores them from, saving the pass over memory that copying them
    /// afterwards takes (the coordinator's parameter file in shared memory, or its inline bytes).
    pub fn step_scaled_from(
        &self,
        params: &mut [f32],
        divisor: f32,
        state: &mut OptimizerState,
        grad: &(impl GradientBlocks + ?Sized),
        mirror: Option<&mut [f32]>,
    ) -> Result<()> {
        if mirror.as_ref().is_some_and(|m| m.len() != params.len()) {
            return Err(Error::Tensor(format!(
                "optimizer step: {} parameters but a mirror of {} values",
                params.len(),
                mirror.map_or(0, |m| m.len())
            )));
        }
        state.check(self, params.len())?;
        match (self, &mut state.moments) {
            (
                OptimizerConfig::Adam {
                    lr,
                    beta1,
                    beta2,
                    eps,
                    weight_decay,
                },
                Moments::Adam {
                    exp_avg,
                    exp_avg_sq,
                },
            ) => {
                let step = state.step + 1;
                let scalars = adam::Scalars::new(*lr, *beta1, *beta2, *eps, *weight_decay, step)
                    .with_divisor(divisor);
                adam::step_from(&scalars, params, exp_avg, exp_avg_sq, grad, mirror);
                state.step = step;
                Ok(())
            }
            _ => {
                let mut scratch = Vec::new();
                let grad = grad.block(0..params.len(), &mut scratch);
                self.step_scaled(params, grad, divisor, state)?;
                if let Some(mirror) = mirror {
                    crate::kernels::copy_values(mirror, params);
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ops::Range;

    /// A gradient that is made in the scratch block by block, as a summed one is.
    struct MadeInScratch<'a>(&'a [f32]);

    impl GradientBlocks for MadeInScratch<'_> {
        fn block<'a>(&'a self, range: Range<usize>, scratch: &'a mut Vec<f32>) -> &'a [f32] {
            scratch.clear();
            scratch.extend_from_slice(&self.0[range]);
            scratch
        }
    }

    /// `step_scaled_from` gives `step_scaled`'s bits, for both optimizers, at lengths below and
    /// above the parallel threshold (with a partial last block), over several steps, whether it
    /// reads the gradient where it is (with a mirror) or made block by block (without).
    #[test]
    fn a_gradient_made_block_by_block_steps_like_a_whole_one() {
        for config in [OptimizerConfig::adam(1e-3), OptimizerConfig::sgd(1e-2, 0.9)] {
            for n in [1000, PARALLEL_MIN + 3 * CHUNK + 17] {
                let grad: Vec<f32> = (0..n)
                    .map(|i| ((i * 7919) % 1000) as f32 / 313.0 - 1.5)
                    .collect();
                let start: Vec<f32> = (0..n).map(|i| (i % 97) as f32 * 0.01).collect();
                let (mut whole, mut blocks, mut mirrored) =
                    (start.clone(), start.clone(), start.clone());
                let (mut whole_state, mut blocks_state, mut mirrored_state) = (
                    config.init_state(n),
                    config.init_state(n),
                    config.init_state(n),
                );
                for _ in 0..3 {
                    config
                        .step_scaled(&mut whole, &grad, 3.0, &mut whole_state)
                        .unwrap();
                    config
                        .step_scaled_from(
                            &mut blocks,
                            3.0,
                            &mut blocks_state,
                            &MadeInScratch(&grad),
                            None,
                        )
                        .unwrap();
                    let mut mirror = vec![f32::NAN; n];
                    config
                        .step_scaled_from(
                            &mut mirrored,
                            3.0,
                            &mut mirrored_state,
                            grad.as_slice(),
                            Some(&mut mirror),
                        )
                        .unwrap();
                    assert_eq!(
                        mirror,
                        mirrored,
                        "{}: the mirror holds the step",
                        config.name()
                    );
                }
                let name = config.name();
                assert_ne!(whole, start, "{name}: the steps must change the parameters");
                assert_eq!(blocks, whole, "{name}, {n} values: parameters");
                assert_eq!(blocks_state, whole_state, "{name}, {n} values: state");
                assert_eq!(mirrored, whole, "{name}, {n} values: mirrored parameters");
                assert_eq!(
                    mirrored_state, whole_state,
                    "{name}, {n} values: mirrored state"
                );
                let mut short = vec![0.0; n - 1];
                let e = config
                    .step_scaled_from(
                        &mut mirrored,
                        3.0,
                        &mut mirrored_state,
                        grad.as_slice(),
                        Some(&mut short),
                    )
                    .unwrap_err();
                assert!(e.to_string().contains("mirror"), "{e}");
                assert_eq!(mirrored, whole, "{name}: a refused step changes nothing");
            }
        }
    }
}

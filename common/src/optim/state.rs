//! An optimizer's state: the step counter and named moment buffers, for checkpoints.

use crate::{Error, Result};

use super::OptimizerConfig;

/// Everything an optimizer carries from one step to the next. Buffers have PyTorch's state-dict
/// names and the parameters' flat layout.
#[derive(Debug, PartialEq)]
pub struct OptimizerState {
    /// Steps taken so far (PyTorch's `state['step']`); Adam's bias correction uses it.
    pub step: u64,
    pub moments: Moments,
}

/// The per-parameter buffers of each optimizer.
#[derive(Debug, PartialEq)]
pub enum Moments {
    Adam {
        /// First moment m (running mean of g).
        exp_avg: Vec<f32>,
        /// Second moment v (running mean of g^2).
        exp_avg_sq: Vec<f32>,
    },
    Sgd {
        /// Momentum buffer b: `None` before the first step and whenever momentum is 0.
        momentum_buffer: Option<Vec<f32>>,
    },
}

// `clone_from` reuses the target's buffers: a checkpoint's snapshot copies the state into the
// previous snapshot's, under the coordinator's state lock, and fresh buffers would first have
// their pages faulted in (about 3 ms of the default model's 5 MB of moments on a 2-core VM,
// docs/scaling.md §29).
impl Clone for OptimizerState {
    fn clone(&self) -> Self {
        OptimizerState {
            step: self.step,
            moments: self.moments.clone(),
        }
    }

    fn clone_from(&mut self, source: &Self) {
        let OptimizerState { step, moments } = self;
        *step = source.step;
        moments.clone_from(&source.moments);
    }
}

impl Clone for Moments {
    fn clone(&self) -> Self {
        match self {
            Moments::Adam {
                exp_avg,
                exp_avg_sq,
            } => Moments::Adam {
                exp_avg: exp_avg.clone(),
                exp_avg_sq: exp_avg_sq.clone(),
            },
            Moments::Sgd { momentum_buffer } => Moments::Sgd {
                momentum_buffer: momentum_buffer.clone(),
            },
        }
    }

    fn clone_from(&mut self, source: &Self) {
        match (self, source) {
            (
                Moments::Adam {
                    exp_avg,
                    exp_avg_sq,
                },
                Moments::Adam {
                    exp_avg: from_avg,
                    exp_avg_sq: from_avg_sq,
                },
            ) => {
                copy_reusing(exp_avg, from_avg);
                copy_reusing(exp_avg_sq, from_avg_sq);
            }
            (
                Moments::Sgd {
                    momentum_buffer: Some(buffer),
                },
                Moments::Sgd {
                    momentum_buffer: Some(from),
                },
            ) => copy_reusing(buffer, from),
            (this, source) => *this = source.clone(),
        }
    }
}

/// `dst = src.to_vec()` in `dst`'s allocation (the copy kernel avoids `memcpy`'s slow case on a
/// Zen 3, docs/scaling.md §25).
fn copy_reusing(dst: &mut Vec<f32>, src: &[f32]) {
    dst.resize(src.len(), 0.0);
    crate::kernels::copy_values(dst, src);
}

const EXP_AVG: &str = "exp_avg";
const EXP_AVG_SQ: &str = "exp_avg_sq";
const MOMENTUM_BUFFER: &str = "momentum_buffer";

impl OptimizerState {
    /// The buffers by name, for saving: Adam `exp_avg`, `exp_avg_sq`; SGD `momentum_buffer` once
    /// it exists; nothing for plain SGD.
    pub fn buffers(&self) -> Vec<(&'static str, &[f32])> {
        match &self.moments {
            Moments::Adam {
                exp_avg,
                exp_avg_sq,
            } => vec![(EXP_AVG, exp_avg), (EXP_AVG_SQ, exp_avg_sq)],
            Moments::Sgd {
                momentum_buffer: Some(buffer),
            } => vec![(MOMENTUM_BUFFER, buffer)],
            Moments::Sgd {
                momentum_buffer: None,
            } => vec![],
        }
    }

    /// Rebuilds a state from [`buffers`](Self::buffers)' output. Fails on a missing, unexpected or
    /// duplicated buffer name, or buffers of different lengths.
    pub fn from_buffers(
        config: &OptimizerConfig,
        step: u64,
        buffers: Vec<(String, Vec<f32>)>,
    ) -> Result<Self> {
        let expected: &[&str] = match config {
            OptimizerConfig::Adam { .. } => &[EXP_AVG, EXP_AVG_SQ],
            OptimizerConfig::Sgd { .. } => &[MOMENTUM_BUFFER],
        };
        let mut found: Vec<Option<Vec<f32>>> = vec![None; expected.len()];
        for (name, values) in buffers {
            let Some(slot) = expected.iter().position(|&e| e == name) else {
                return Err(Error::Tensor(format!(
                    "unexpected {} buffer `{name}`: expected {}",
                    config.name(),
                    expected.join(", ")
                )));
            };
            if found[slot].replace(values).is_some() {
                return Err(Error::Tensor(format!(
                    "{} buffer `{name}` given twice",
                    config.name()
                )));
            }
        }
        let lens: Vec<usize> = found.iter().flatten().map(Vec::len).collect();
        if lens.windows(2).any(|w| w[0] != w[1]) {
            return Err(Error::Tensor(format!(
                "{} buffers {} have different lengths {lens:?}",
                config.name(),
                expected.join(", ")
            )));
        }
        let moments = match config {
            OptimizerConfig::Adam { .. } => {
                let mut found = found.into_iter();
                let mut take = |name: &str| {
                    found
                        .next()
                        .flatten()
                        .ok_or_else(|| Error::Tensor(format!("Adam state has no `{name}` buffer")))
                };
                Moments::Adam {
                    exp_avg: take(EXP_AVG)?,
                    exp_avg_sq: take(EXP_AVG_SQ)?,
                }
            }
            OptimizerConfig::Sgd { momentum, .. } => {
                let momentum_buffer = found.pop().flatten();
                if *momentum == 0.0 && momentum_buffer.is_some() {
                    return Err(Error::Tensor(format!(
                        "SGD without momentum has no `{MOMENTUM_BUFFER}`, but one was given"
                    )));
                }
                if *momentum != 0.0 && step > 0 && momentum_buffer.is_none() {
                    return Err(Error::Tensor(format!(
                        "SGD with momentum {momentum} at step {step} has no `{MOMENTUM_BUFFER}`"
                    )));
                }
                Moments::Sgd { momentum_buffer }
            }
        };
        Ok(OptimizerState { step, moments })
    }

    /// Checks that this state belongs to `config` and its buffers fit `n_params` parameters
    /// (what [`OptimizerConfig::step`] checks before it changes anything).
    pub fn check(&self, config: &OptimizerConfig, n_params: usize) -> Result<()> {
        let kind = match self.moments {
            Moments::Adam { .. } => "adam",
            Moments::Sgd { .. } => "sgd",
        };
        if kind != config.name() {
            return Err(Error::Tensor(format!(
                "optimizer state is {kind}'s but the optimizer is {}",
                config.name()
            )));
        }
        for (name, buffer) in self.buffers() {
            if buffer.len() != n_params {
                return Err(Error::Tensor(format!(
                    "optimizer buffer `{name}` has {} entries but there are {n_params} parameters",
                    buffer.len()
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn adam(n: usize, fill: f32) -> OptimizerState {
        OptimizerState {
            step: fill as u64,
            moments: Moments::Adam {
                exp_avg: vec![fill; n],
                exp_avg_sq: vec![fill * 2.0; n],
            },
        }
    }

    fn sgd(buffer: Option<Vec<f32>>) -> OptimizerState {
        OptimizerState {
            step: 9,
            moments: Moments::Sgd {
                momentum_buffer: buffer,
            },
        }
    }

    fn first_buffer(state: &OptimizerState) -> *const f32 {
        state.buffers()[0].1.as_ptr()
    }

    #[test]
    fn clone_from_copies_into_the_buffers_it_has() {
        let mut snapshot = adam(1000, 1.0);
        let kept = first_buffer(&snapshot);
        let source = adam(1000, 5.0);
        snapshot.clone_from(&source);
        assert_eq!(snapshot, source);
        assert_eq!(first_buffer(&snapshot), kept, "the allocation was reused");

        // Another length, another optimizer, a buffer that appears or goes: still equal.
        for source in [
            adam(10, 3.0),
            adam(2000, 4.0),
            sgd(Some(vec![0.5; 7])),
            sgd(None),
            sgd(Some(vec![0.25; 3])),
            adam(5, 6.0),
        ] {
            snapshot.clone_from(&source);
            assert_eq!(snapshot, source);
            assert_eq!(snapshot.clone(), source);
        }
    }
}

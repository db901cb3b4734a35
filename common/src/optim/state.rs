//! An optimizer's state: the step counter and named moment buffers, for checkpoints.

use crate::{Error, Result};

use super::OptimizerConfig;

/// Everything an optimizer carries from one step to the next. Buffers have PyTorch's state-dict
/// names and the parameters' flat layout.
#[derive(Debug, Clone, PartialEq)]
pub struct OptimizerState {
    /// Steps taken so far (PyTorch's `state['step']`); Adam's bias correction uses it.
    pub step: u64,
    pub moments: Moments,
}

/// The per-parameter buffers of each optimizer.
#[derive(Debug, Clone, PartialEq)]
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

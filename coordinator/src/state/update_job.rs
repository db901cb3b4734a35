//! A completed step's update as a job that runs off the state machine: the tree sum, the mean,
//! optional clipping and the optimizer, on whatever thread takes it.

use std::collections::HashMap;

use common::model::BatchStats;
use common::optim::{Clipped, OptimizerConfig, OptimizerState, fill_measuring_norm};
use common::train::{BlockwiseSum, Node, ReceivedGradient, ReductionTree};

/// A completed step's update, detached from the state machine so it can run on other threads
/// while heartbeats and long polls go on: the tree sum of the received nodes in the fixed order
/// (docs/design.md §2), division by the step's example count, optional clipping, the optimizer.
#[derive(Debug)]
pub struct UpdateJob {
    pub global_step: u64,
    pub(super) received: HashMap<Node, ReceivedGradient>,
    pub(super) tree: ReductionTree,
    pub(super) optimizer: OptimizerConfig,
    pub(super) clip_norm: Option<f64>,
    pub(super) params: Vec<f32>,
    pub(super) opt_state: OptimizerState,
    pub(super) clip_buffer: Vec<f32>,
}

/// What an [`UpdateJob`] hands back: the parameters and optimizer state (updated unless
/// `outcome` is an error, in which case they are the step's inputs, untouched), and the step's
/// statistics.
#[derive(Debug)]
pub struct UpdateDone {
    pub global_step: u64,
    pub params: Vec<f32>,
    pub opt_state: OptimizerState,
    pub outcome: Result<BatchStats, String>,
    /// The gradient buffers the update consumed, for reuse.
    pub spent: Vec<Vec<f32>>,
    /// Workers whose gradient, read where they wrote it, failed its second check as the update
    /// read it: rewritten after it was accepted (those values were used as zeros).
    pub rewritten: Vec<u64>,
    /// The clipped update's buffer, for the next step's.
    pub clip_buffer: Vec<f32>,
}

impl UpdateJob {
    /// How many parameters the update makes.
    pub fn param_len(&self) -> usize {
        self.params.len()
    }

    /// CPU-heavy and pure: runs on whatever thread calls it (rayon inside for long vectors).
    /// With a `mirror` as long as the parameters, the new parameters are also written there when
    /// the outcome is `Ok`, within the optimizer's pass where it can (Adam, with or without
    /// clipping): the coordinator's parameter file for the workers on its host, or the buffer
    /// sent inline when none is attached; one pass over memory fewer than copying them
    /// afterwards.
    pub fn run(self, mut mirror: Option<&mut [f32]>) -> UpdateDone {
        let UpdateJob {
            global_step,
            received,
            tree,
            optimizer,
            clip_norm,
            mut params,
            mut opt_state,
            mut clip_buffer,
        } = self;
        let mut spent = Vec::new();
        let mut rewritten = Vec::new();
        let outcome = (|| {
            if let Some(mirror) = &mirror
                && mirror.len() != params.len()
            {
                return Err(format!(
                    "the parameter mirror holds {} values, the model has {}",
                    mirror.len(),
                    params.len()
                ));
            }
            let (sum, stats) =
                BlockwiseSum::new(&tree, received, params.len()).map_err(|e| e.to_string())?;
            let n = stats.examples.max(1) as f32;
            let stepped = match clip_norm {
                // The mean gradient is divided inside the optimizer's pass (same bits). Adam
                // reads the tree's top block by block (summed on the fly, or the one received
                // gradient where it is) and stores the new values in the mirror from its
                // registers; SGD takes the whole gradient and the mirror is copied after.
                None => {
                    optimizer.step_scaled_from(&mut params, n, &mut opt_state, &sum, mirror.take())
                }
                // The mean gradient made and its norm measured in one pass; the optimizer then
                // reads it clipped, block by block, writing the mirror as it goes. The same bits
                // as dividing, clipping in place and stepping, in two passes over memory instead
                // of six.
                Some(max) => {
                    let grad = &mut clip_buffer;
                    grad.resize(params.len(), 0.0);
                    let norm = fill_measuring_norm(grad, |range, out| {
                        sum.sum_into(range, out);
                        out.iter_mut().for_each(|g| *g /= n);
                    });
                    let clipped = Clipped::new(grad, norm, max);
                    optimizer.step_scaled_from(
                        &mut params,
                        1.0,
                        &mut opt_state,
                        &clipped,
                        mirror.take(),
                    )
                }
            };
            rewritten = sum.rewritten();
            spent.extend(sum.into_inputs());
            stepped.map_err(|e| format!("optimizer: {e}"))?;
            Ok(stats)
        })();
        UpdateDone {
            global_step,
            params,
            opt_state,
            outcome,
            spent,
            rewritten,
            clip_buffer,
        }
    }
}

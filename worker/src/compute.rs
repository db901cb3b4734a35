//! Turning a task into node gradients, on the worker's own rayon pool (never on the async
//! runtime's threads), with the step's buffers reused from one task to the next.

use std::collections::HashMap;
use std::sync::Arc;

use common::kernels::with_pool_awake;
use common::model::BatchStats;
use common::train::{Engine, GradientSum, Node, ReductionTree, ShardBatch};
use ndarray::Array2;
use proto::messages::{NodeResult, RunSpec, ShardWork, Task, TensorRef};
use proto::shared_memory::{ParamsLease, SharedClient};
use proto::tensor_pool::TensorPool;
use rayon::prelude::*;

use crate::cpu_time::ComputeClock;
use crate::error::{Error, Result};
use crate::shard_cache::ShardCache;

/// What a worker needs to know about the run it serves.
#[derive(Debug)]
pub struct RunContext {
    pub run_id: String,
    pub shards: usize,
    pub engine: Engine,
    pub idle_threads: IdleThreads,
}

impl RunContext {
    pub fn new(run: &RunSpec, idle_threads: IdleThreads) -> Result<Self> {
        Ok(RunContext {
            run_id: run.run_id.clone(),
            shards: run.shards,
            engine: Engine::new(run.model.clone(), run.samples, run.seed)?,
            idle_threads,
        })
    }
}

/// What the compute pool's idle threads do between the parallel sections of a step
/// (`common::kernels::with_pool_awake`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum IdleThreads {
    /// Spin, taking the step's next piece of work at once (5% more samples/s for the engine on
    /// two vCPUs, docs/scaling.md §18): for a worker that has its cores to itself.
    Spin,
    /// Sleep until woken: for workers sharing cores (a spinning thread takes a core another
    /// worker needs).
    Sleep,
}

impl IdleThreads {
    /// Runs `work` on a thread of the compute pool, the other threads spinning for its work or
    /// sleeping between its parallel sections.
    pub fn run<R>(self, work: impl FnOnce() -> R) -> R {
        match self {
            IdleThreads::Spin => with_pool_awake(work),
            IdleThreads::Sleep => work(),
        }
    }
}

/// Buffers that live across tasks, so a steady-state step allocates no multi-megabyte vectors.
#[derive(Debug, Default)]
pub struct StepBuffers {
    params: Vec<f32>,
    sums: Vec<GradientSum>,
    /// Gradients sent inline are lent to their messages from here, and come back once sent.
    lent_gradients: TensorPool,
}

/// A task's results and the CPU time its computation took.
#[derive(Debug)]
pub struct TaskOutput {
    pub results: Vec<NodeResult>,
    /// CPU seconds of the computation divided by the pool's threads (see `crate::cpu_time`).
    pub compute_seconds: f64,
    /// Whether the parameters were read in place from a parameter file (else decoded inline).
    pub params_in_place: bool,
    /// Shards computed, and those whose rows had been gathered ahead.
    pub shards: u64,
    pub shards_gathered_ahead: u64,
}

/// Deliberate misbehaviour, so tests can check the coordinator's defences (`--inject-fault`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// At this global step, send a gradient containing NaN.
    NanAtStep(u64),
    /// At this global step, send a gradient one value short.
    ShortAtStep(u64),
    /// At this global step, send a finite but huge gradient (1e22 in every value).
    HugeAtStep(u64),
    /// At this global step, send a gradient one ulp off in one value (finite, plausible, wrong).
    UlpAtStep(u64),
    /// From this global step on, take the task and never answer (heartbeats go on).
    StallAtStep(u64),
    /// From this global step on, compute honest gradients, then overwrite each with NaN in shared
    /// memory once the coordinator has accepted it (while its update may still read it there).
    RewriteFromStep(u64),
}

impl Fault {
    /// Whether results accepted for `step` are to be overwritten where they were written.
    pub fn rewrites_step(&self, step: u64) -> bool {
        matches!(self, Fault::RewriteFromStep(from) if step >= *from)
    }

    /// Whether this fault corrupts the gradient sent for `step` (a stall, or a rewrite after the
    /// result is accepted, is not a corruption of what is sent).
    fn corrupts_step(&self, step: u64) -> bool {
        matches!(self, Fault::NanAtStep(s) | Fault::ShortAtStep(s) | Fault::HugeAtStep(s)
            | Fault::UlpAtStep(s) if *s == step)
    }
}

impl std::str::FromStr for Fault {
    type Err = String;

    /// `nan@STEP`, `short@STEP`, `huge@STEP`, `ulp@STEP`, `stall@STEP` or `rewrite@STEP`.
    fn from_str(s: &str) -> Result<Self, String> {
        const FORMS: &str =
            "use nan@STEP, short@STEP, huge@STEP, ulp@STEP, stall@STEP or rewrite@STEP";
        let (kind, step) = s
            .split_once('@')
            .ok_or_else(|| format!("fault `{s}`: {FORMS}"))?;
        let step: u64 = step
            .parse()
            .map_err(|_| format!("fault `{s}`: `{step}` is not a step number"))?;
        match kind {
            "nan" => Ok(Fault::NanAtStep(step)),
            "short" => Ok(Fault::ShortAtStep(step)),
            "huge" => Ok(Fault::HugeAtStep(step)),
            "ulp" => Ok(Fault::UlpAtStep(step)),
            "stall" => Ok(Fault::StallAtStep(step)),
            "rewrite" => Ok(Fault::RewriteFromStep(step)),
            _ => Err(format!("fault `{s}`: {FORMS}")),
        }
    }
}

/// Computes every node of `task`; the results go back in the task's order, their gradients
/// through `shared` when the worker is attached to the coordinator's shared memory. `None` when
/// the task turned out stale (its parameter file already holds a later step's parameters).
#[allow(clippy::too_many_arguments)]
pub async fn run_task(
    ctx: &Arc<RunContext>,
    tree: &ReductionTree,
    pool: &Arc<rayon::ThreadPool>,
    cache: &mut ShardCache,
    task: Task,
    shared: Option<&Arc<SharedClient>>,
    buffers: &mut StepBuffers,
    fault: &mut Option<Fault>,
) -> Result<Option<TaskOutput>> {
    if let Some(Fault::StallAtStep(from)) = fault
        && task.step >= *from
    {
        tracing::warn!("step {}: stalling on purpose (--inject-fault)", task.step);
        std::future::pending::<()>().await;
    }
    let layout_len = ctx.engine.layout().len();
    let params = std::mem::take(&mut buffers.params);
    let dim = ctx.engine.config().input_dim;
    // Rows gathered while the coordinator handled the last result (`ShardCache::gather_ahead`).
    let ahead: Vec<Vec<Option<Array2<f32>>>> = task
        .nodes
        .iter()
        .map(|work| {
            work.shards
                .iter()
                .map(|s| cache.take_gathered(s.shard, &s.examples))
                .collect()
        })
        .collect();
    let shards = ahead.iter().map(|node| node.len() as u64).sum();
    let shards_gathered_ahead = ahead.iter().flatten().flatten().count() as u64;
    let cache = &*cache;
    // On the pool, whose threads are idle until the computation: the parameters (decoded, or a
    // parameter file locked, which waits only while the coordinator writes it) beside the rows.
    // The async thread waits meanwhile (a fraction of a millisecond; heartbeats are 500 ms
    // apart).
    let (params, nodes) = pool.install(|| {
        rayon::join(
            || Params::of(&task, shared.map(|s| &**s), layout_len, params),
            || gather_rows(&task, cache, ctx.shards, dim, ahead),
        )
    });
    let (Some(params), nodes) = (params?, nodes?) else {
        tracing::info!(
            "step {}: task stale (the coordinator has rewritten its parameters)",
            task.step
        );
        return Ok(None);
    };
    tracing::trace!("step {}: parameters and rows ready", task.step);
    let mut sums = std::mem::take(&mut buffers.sums);
    let lent_gradients = buffers.lent_gradients.clone();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let ctx = Arc::clone(ctx);
    let pool_shared = shared.cloned();
    let tree = *tree;
    let epoch = task.epoch;
    let step = task.step;
    // A fault due now is applied to the first node's gradient where it is computed.
    let due = fault.filter(|f| f.corrupts_step(task.step));
    if due.is_some() && !nodes.is_empty() {
        *fault = None;
    }
    let params_in_place = matches!(params, Params::InPlace(_));
    let clock = ComputeClock::start(pool.current_num_threads());
    pool.spawn(move || {
        // The nodes' statistics, and whether the first gradient must lose its last value.
        let compute = |grads: Vec<&mut [f32]>| -> Result<(Vec<BatchStats>, bool)> {
            let mut short = false;
            let stats = nodes
                .iter()
                .zip(grads)
                .enumerate()
                .map(|(i, ((node, shards), grad))| {
                    let batches: Vec<ShardBatch<'_>> = shards
                        .iter()
                        .map(|(shard, x, examples)| ShardBatch {
                            shard: *shard,
                            x: x.view(),
                            examples,
                        })
                        .collect();
                    let stats = ctx.engine.node_gradient_to(
                        params.values(),
                        epoch,
                        &tree,
                        *node,
                        &batches,
                        grad,
                    )?;
                    if i == 0 {
                        short = inject_fault(due, grad);
                    }
                    Ok(stats)
                })
                .collect::<Result<_>>()?;
            Ok((stats, short))
        };
        let run = || {
            // In place in the shared file when attached (no copy), else into the reused buffers.
            let lens = vec![params.values().len(); nodes.len()];
            let in_place = pool_shared.as_ref().and_then(|shared| {
                shared
                    .fill_gradients(step, &lens, compute)
                    .inspect_err(|e| {
                        tracing::warn!(
                            "cannot write gradients to shared memory ({e}); sending inline"
                        )
                    })
                    .ok()
            });
            match in_place {
                Some((refs, stats)) => stats.map(|stats| (Some(refs), stats)),
                None => {
                    sums.resize_with(nodes.len(), || GradientSum::zeros(0));
                    for s in &mut sums {
                        if s.grad.is_empty() {
                            // The last step's was lent to its message (and may be back).
                            s.grad = lent_gradients.take();
                        }
                        s.grad.resize(params.values().len(), 0.0);
                    }
                    compute(sums.iter_mut().map(|s| &mut s.grad[..]).collect())
                        .map(|stats| (None, stats))
                }
            }
        };
        let computed = ctx.idle_threads.run(run);
        let nodes: Vec<Node> = nodes.iter().map(|(node, _)| *node).collect();
        // A parameter file's lease ends here, so the coordinator may rewrite it.
        let params = params.into_buffer();
        let _ = tx.send((computed, nodes, params, sums));
    });
    let (computed, nodes, params, mut sums) = rx
        .await
        .map_err(|_| Error::Other("gradient computation panicked".into()))?;
    tracing::trace!("step {}: gradients computed", task.step);
    let compute_seconds = clock.seconds();
    buffers.params = params.unwrap_or_default();
    let (shared_refs, (stats, short)) = computed?;
    let grads = match shared_refs {
        Some(mut refs) => {
            if let (true, Some(TensorRef::Shared { len, .. })) = (short, refs.first_mut()) {
                *len -= 1;
            }
            refs
        }
        None => {
            if short {
                sums[0].grad.pop();
            }
            // Lent, not copied: encoding them was 0.34 ms of a 14 ms TCP step on a Zen 3, and
            // 0.28-0.31 ms of 11.3-11.6 on an Emerald Rapids Xeon (docs/scaling.md §40, §41).
            sums.iter_mut()
                .map(|s| {
                    TensorRef::Inline(buffers.lent_gradients.lend(std::mem::take(&mut s.grad)))
                })
                .collect()
        }
    };
    tracing::trace!("step {}: gradients written", task.step);
    let results = nodes
        .into_iter()
        .zip(stats)
        .zip(grads)
        .map(|((node, stats), grad)| NodeResult { node, grad, stats })
        .collect();
    buffers.sums = sums;
    Ok(Some(TaskOutput {
        results,
        compute_seconds,
        params_in_place,
        shards,
        shards_gathered_ahead,
    }))
}

/// The coordinator's hint of the examples this task's shards take next step
/// (`Task::next_examples`), kept only for shards this task computes and no larger than what it
/// takes of them now, each once: rows gathered ahead then never take more memory or time than a
/// step's own.
pub fn next_step_hint(task: &mut Task) -> Vec<ShardWork> {
    let hint = std::mem::take(&mut task.next_examples);
    let mut now: HashMap<u32, usize> = task
        .nodes
        .iter()
        .flat_map(|work| work.shards.iter().map(|s| (s.shard, s.examples.len())))
        .collect();
    hint.into_iter()
        .filter(|s| now.remove(&s.shard).is_some_and(|n| s.examples.len() <= n))
        .collect()
}

/// A node and, per shard, its id, rows and example ids.
type NodeRows = (Node, Vec<(u32, Array2<f32>, Vec<u32>)>);

/// The rows of every node of `task`, shard by shard (in parallel on the current pool), taking
/// those in `ahead` (per node, per shard: rows gathered ahead for exactly its examples).
fn gather_rows(
    task: &Task,
    cache: &ShardCache,
    shards: usize,
    dim: usize,
    ahead: Vec<Vec<Option<Array2<f32>>>>,
) -> Result<Vec<NodeRows>> {
    task.nodes
        .iter()
        .zip(ahead)
        .map(|(work, ahead)| {
            if work.node.hi as usize > shards {
                return Err(Error::Protocol(format!(
                    "task node {}..{} is outside the run's {shards} shards",
                    work.node.lo, work.node.hi
                )));
            }
            let rows = work
                .shards
                .par_iter()
                .zip(ahead)
                .map(|(s, ready)| {
                    let x = match ready {
                        Some(x) => x,
                        None => cache.gather(s.shard, &s.examples, dim)?,
                    };
                    Ok((s.shard, x, s.examples.clone()))
                })
                .collect::<Result<Vec<_>>>()?;
            Ok((work.node, rows))
        })
        .collect()
}

/// Corrupts `grad` as `due` says; true for a short gradient, whose last value the caller must
/// drop.
fn inject_fault(due: Option<Fault>, grad: &mut [f32]) -> bool {
    match due {
        Some(Fault::NanAtStep(_)) => grad[0] = f32::NAN,
        Some(Fault::ShortAtStep(_)) => return true,
        Some(Fault::HugeAtStep(_)) => grad.iter_mut().for_each(|g| *g = 1e22),
        Some(Fault::UlpAtStep(_)) => grad[0] = f32::from_bits(grad[0].to_bits() ^ 1),
        Some(Fault::StallAtStep(_) | Fault::RewriteFromStep(_)) | None => {}
    }
    false
}

/// A task's parameters: decoded from the message into a reused buffer, or read where the
/// coordinator wrote them, its parameter file locked until the computation ends.
enum Params {
    Decoded(Vec<f32>),
    InPlace(ParamsLease),
}

impl Params {
    /// The parameters of `task` (`buffer` holds inline ones); `None` if the task is stale.
    fn of(
        task: &Task,
        shared: Option<&SharedClient>,
        expected: usize,
        mut buffer: Vec<f32>,
    ) -> Result<Option<Self>> {
        let params = match task.params {
            TensorRef::Inline(ref bytes) => {
                proto::tensor::decode_f32_into(bytes, &mut buffer);
                Params::Decoded(buffer)
            }
            TensorRef::ParameterFile { slot, len } => {
                let shared = shared.ok_or_else(|| {
                    Error::Protocol(
                        "the coordinator sent parameters in shared memory this worker is not \
                         attached to"
                            .into(),
                    )
                })?;
                if len != expected as u64 {
                    return Err(Error::Protocol(format!(
                        "the coordinator sent {len} parameters in parameter file {slot}, this \
                         model has {expected}"
                    )));
                }
                match shared.lease_params(slot, task.step, len) {
                    Ok(Some(lease)) => Params::InPlace(lease),
                    Ok(None) => return Ok(None),
                    // The directory is gone: the coordinator has ended or restarted, which the
                    // next call will tell; this task is void either way.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        tracing::warn!(
                            "step {}: parameter file {slot} is gone ({e}); skipping the task",
                            task.step
                        );
                        return Ok(None);
                    }
                    Err(e) => {
                        return Err(Error::Protocol(format!(
                            "cannot read the parameters of step {}: {e}",
                            task.step
                        )));
                    }
                }
            }
            TensorRef::Shared { .. } => {
                return Err(Error::Protocol(
                    "the coordinator sent parameters as a gradient-file region: run the same \
                     release on both sides"
                        .into(),
                ));
            }
        };
        let got = params.values().len();
        if got != expected {
            return Err(Error::Protocol(format!(
                "the coordinator sent {got} parameters, this model has {expected}"
            )));
        }
        Ok(Some(params))
    }

    fn values(&self) -> &[f32] {
        match self {
            Params::Decoded(values) => values,
            Params::InPlace(lease) => lease.values(),
        }
    }

    /// The buffer to reuse for the next task's inline parameters (the lease, if any, ends).
    fn into_buffer(self) -> Option<Vec<f32>> {
        match self {
            Params::Decoded(values) => Some(values),
            Params::InPlace(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_next_step_hint_is_kept_only_for_this_tasks_shards_and_sizes() {
        let work = |shard, examples: &[u32]| ShardWork {
            shard,
            examples: examples.to_vec(),
        };
        let mut task = Task {
            step: 4,
            epoch: 0,
            params: TensorRef::Inline(Default::default()),
            nodes: vec![proto::messages::NodeWork {
                node: Node { lo: 2, hi: 4 },
                shards: vec![work(2, &[20, 21]), work(3, &[30, 31])],
            }],
            run_id: "r".into(),
            next_examples: vec![
                work(2, &[22, 23]),
                work(3, &[32, 33, 34]),
                work(7, &[70]),
                work(2, &[24]),
            ],
        };
        // Shard 3's hint is larger than a step's share of it, shard 7 is not this task's, and
        // shard 2 is hinted once.
        assert_eq!(next_step_hint(&mut task), vec![work(2, &[22, 23])]);
    }
}

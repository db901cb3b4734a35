//! The coordinator's state machine. No I/O and no clock: time comes in as arguments, and what
//! the outside world must do (evaluate, checkpoint, log) comes out as [`Output`]s. Every tricky
//! case (a worker lost mid-step, a late or duplicate result, a poisoned gradient) is a plain unit
//! test with no network.
//!
//! A step: the step's examples are fixed by the [`ShardPlan`]; live workers each get one tree
//! node and are asked for its sum. When the received nodes cover the tree the machine emits
//! [`Output::StepReady`] and hands the update out ([`StateMachine::take_update`]): the driver, or
//! the mailbox thread that delivered the step's last result
//! ([`StateMachine::take_update_unless_held`]), sums the tree in its fixed order (docs/design.md
//! §2), divides by the step's example count, steps the optimizer off the async runtime, and hands
//! the parameters back ([`StateMachine::finish_update`]). Which worker computed what never
//! changes the bits, so a lost worker's nodes simply move to a survivor.
//!
//! `stragglers.rs` backs up nodes held too long; `update_job.rs` is the update itself.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::model::BatchStats;
use common::optim::{Moments, OptimizerConfig, OptimizerState};
use common::train::{
    GradientSum, GradientValues, MAX_ABS_GRADIENT_PER_EXAMPLE, Magnitude, Node, ReceivedGradient,
    ReductionTree, ShardPlan, SharedGradient, SharedValues, check_measured, check_shared,
};

use crate::assignment::tree_blocks;
use crate::verification::{self, Copies, Decision, Source};

mod stragglers;
mod update_job;

pub use update_job::{UpdateDone, UpdateJob};

/// A worker's id within this coordinator's lifetime. Ids carry an incarnation prefix so a worker
/// left over from a previous coordinator process is never mistaken for a new one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkerId(pub u64);

impl std::fmt::Display for WorkerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:x}", self.0)
    }
}

/// A node whose result was rejected from this many different workers (or from the only worker
/// there is) is computed by the coordinator itself: if its own result is bad too, training
/// diverged and the run stops; if not, the workers were wrong. No worker can stop the run.
const REJECTIONS_BEFORE_COMPUTING_HERE: usize = 2;

/// A worker with this many rejected results that other workers then computed correctly is
/// quarantined: removed, and refused if it registers again under the same name.
const STRIKES_BEFORE_QUARANTINE: u32 = 2;

/// Settings of the state machine.
#[derive(Debug, Clone)]
pub struct StateConfig {
    pub plan: ShardPlan,
    pub epochs: u64,
    pub optimizer: OptimizerConfig,
    pub clip_norm: Option<f64>,
    /// Workers to wait for before the first step.
    pub min_workers: usize,
    /// A worker silent for this long is declared lost.
    pub worker_timeout: Duration,
    /// With no worker at all for this long during training, the run stops.
    pub no_worker_timeout: Duration,
    /// Ask for a checkpoint every this many steps (0: not by step count).
    pub checkpoint_every: u64,
    /// Ask for a checkpoint after the first step that ends this long after the last checkpoint
    /// (or the first step's start); `None`: not by the clock. Epoch ends always checkpoint.
    pub checkpoint_interval: Option<Duration>,
    pub param_len: usize,
    /// Fraction of tree nodes computed twice and compared bit for bit (`--verify`).
    pub verify_fraction: f64,
    /// Picks which nodes are verified; drawn by the coordinator and never sent to workers.
    pub verify_secret: u64,
}

/// Where training is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Position {
    pub epoch: u64,
    pub step_in_epoch: u64,
    pub global_step: u64,
}

/// Sums over an epoch's steps, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize, serde::Deserialize)]
pub struct EpochTotals {
    pub steps: u64,
    /// The steps' examples and ELBO sums.
    #[serde(flatten)]
    pub stats: BatchStats,
    /// Wall time of the steps, from the step's start to its update.
    pub step_seconds: f64,
    /// Per step, the slowest worker's compute time (the critical path), summed.
    pub compute_seconds: f64,
    /// Time in the tree reduction and optimizer on the coordinator.
    pub update_seconds: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Phase {
    WaitingForWorkers,
    Training,
    /// Every result of the step is in; the driver is applying the update
    /// ([`StateMachine::take_update`], [`StateMachine::finish_update`]).
    Updating,
    /// An epoch ended; waiting for the held-out evaluation ([`StateMachine::finish_evaluation`]).
    Evaluating,
    Finished,
    Failed(String),
}

/// What the outside world should do or report.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    WorkerJoined {
        worker: WorkerId,
        name: String,
    },
    WorkerLost {
        worker: WorkerId,
        name: String,
        reason: String,
        /// Tree nodes of the current step that moved to other workers.
        moved: Vec<Node>,
    },
    /// `slow` held `node` for `held_seconds`, past the straggler limit: `backup` computes it too.
    NodeBackedUp {
        slow: WorkerId,
        name: String,
        node: Node,
        held_seconds: f64,
        backup: WorkerId,
    },
    ResultRejected {
        worker: WorkerId,
        name: String,
        step: u64,
        node: Node,
        reason: String,
    },
    /// Every result of `global_step` is in: take the update ([`StateMachine::take_update`]),
    /// run it, and hand it back ([`StateMachine::finish_update`]).
    StepReady {
        global_step: u64,
    },
    StepApplied {
        position: Position,
        examples: u64,
        elbo: f64,
        /// Wall time of the step, from its start to its update applied.
        seconds: f64,
    },
    /// The epoch's last step was applied: evaluate, record, then call `finish_evaluation`. Other
    /// threads take no update until [`StateMachine::snapshot_taken`].
    EpochEnded {
        epoch: u64,
        totals: EpochTotals,
    },
    /// Compute `work` here (its copies disagreed, or no second worker can verify it) and hand the
    /// result to [`StateMachine::accept_own_computation`].
    ComputeNode {
        global_step: u64,
        epoch: u64,
        work: NodeWork,
    },
    /// A verified node's copies agreed (`agreed`), or the coordinator's computation decided.
    NodeVerified {
        step: u64,
        node: Node,
        agreed: bool,
    },
    /// `worker` sent wrong results: removed, and refused if it registers again.
    WorkerQuarantined {
        worker: WorkerId,
        name: String,
        reason: String,
    },
    /// Take a checkpoint of the step just applied; other threads take no update until
    /// [`StateMachine::snapshot_taken`].
    CheckpointDue,
    Finished,
    Failed(String),
}

pub use proto::messages::{NodeWork, ShardWork};

/// Work handed to a worker.
#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    pub global_step: u64,
    pub epoch: u64,
    pub nodes: Vec<NodeWork>,
    /// The examples the nodes' shards take next step, if it is in the same epoch: a hint the
    /// worker gathers rows by while its result is checked (the next task's own examples count).
    pub next_examples: Vec<ShardWork>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum TaskDecision {
    Task(Task),
    Wait,
    Done,
    UnknownWorker,
}

#[derive(Debug, Clone, PartialEq)]
pub enum SubmitOutcome {
    /// Every result was taken.
    Accepted,
    /// Nothing was wrong with the results, but they were not needed (late, duplicate, old step).
    Ignored(String),
    /// At least one result was invalid and was not used.
    Rejected(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeartbeatAnswer {
    Known,
    Unknown,
    Done,
}

#[derive(Debug)]
struct WorkerInfo {
    name: String,
    last_seen: Instant,
}

#[derive(Debug)]
struct StepState {
    global_step: u64,
    /// Per shard, the example ids this step uses.
    examples: Vec<Vec<u32>>,
    queued: BTreeMap<WorkerId, Vec<Node>>,
    in_flight: BTreeMap<WorkerId, Vec<Node>>,
    /// Nodes whose worker was lost when no other worker was alive.
    orphans: Vec<Node>,
    received: HashMap<Node, ReceivedGradient>,
    /// Per node, the workers whose result for it was rejected.
    rejections: HashMap<Node, BTreeSet<WorkerId>>,
    /// Rejected results whose node no other worker has computed yet: (node, worker).
    unconfirmed_rejections: Vec<(Node, WorkerId)>,
    /// Nodes computed twice this step (`--verify`), with the copies received so far.
    verifying: HashMap<Node, Copies>,
    /// When each worker was handed each node it holds.
    handed_out: HashMap<(WorkerId, Node), Instant>,
    /// Nodes given a backup copy, with the worker that was too slow with them.
    backups: HashMap<Node, WorkerId>,
    /// Unverified nodes the coordinator computes as a straggler's backup (no other worker was
    /// left): the first valid result, its or the straggler's, is used.
    own_backups: BTreeSet<Node>,
    /// Workers overtaken by a backup in this step (the others' counts start again).
    overtaken_now: BTreeSet<WorkerId>,
    /// The slowest time from hand-out to an accepted result in this step.
    slowest_node: Duration,
    started: Instant,
    slowest_compute: f64,
    /// Whether [`StateMachine::take_update`] has handed this (complete) step's update out.
    update_taken: bool,
}

impl StepState {
    /// The examples node `node` sums this step.
    fn examples_of(&self, node: Node) -> usize {
        (node.lo..node.hi)
            .map(|s| self.examples[s as usize].len())
            .sum()
    }

    /// The largest magnitude an honest gradient of node `node` can have this step.
    fn gradient_bound(&self, node: Node) -> f32 {
        MAX_ABS_GRADIENT_PER_EXAMPLE * self.examples_of(node).max(1) as f32
    }

    /// What is wrong with node `node`'s result, if anything: its gradient (`check_gradient`,
    /// given the bound on its values, checks its length, finiteness and magnitude), its example
    /// count (in `s`), and its ELBO statistics.
    fn result_problem(
        &self,
        node: Node,
        s: &BatchStats,
        check_gradient: impl FnOnce(f32) -> Result<(), String>,
    ) -> Option<String> {
        let expected_examples = self.examples_of(node);
        check_gradient(self.gradient_bound(node))
            .err()
            .or_else(|| {
                (s.examples != expected_examples as u64).then(|| {
                    format!(
                        "result covers {} examples, the step has {expected_examples} for these \
                         shards",
                        s.examples
                    )
                })
            })
            .or_else(|| {
                (!(s.elbo.is_finite() && s.recon.is_finite() && s.kl.is_finite())).then(|| {
                    format!(
                        "ELBO statistics are not finite (elbo {}, recon {}, kl {})",
                        s.elbo, s.recon, s.kl
                    )
                })
            })
    }
}

/// A result's gradient as it arrived: copied out of a message, or left where a co-located
/// worker wrote it in shared memory (read there until the step's update is done, only through
/// copies measured as they are made: [`SharedValues`]).
#[derive(Debug)]
pub enum ArrivedGradient {
    Owned(Vec<f32>),
    Shared(Arc<dyn SharedValues>),
}

/// A node's result as a worker returned it: its gradient, its sums, and its gradient's
/// [`Magnitude`], measured as the values were copied in from the worker (or where they are), so
/// the check needs no second pass over them.
#[derive(Debug)]
pub struct NodeResult {
    node: Node,
    grad: ArrivedGradient,
    stats: BatchStats,
    magnitude: Magnitude,
}

impl NodeResult {
    /// A result whose gradient's magnitude was measured as it arrived
    /// ([`Magnitude::copy_measuring`], or where it is); `magnitude` must be that of `grad`.
    /// Crate-private: a magnitude from anywhere else (a default of zero, say) would let a
    /// gradient skip the check, so outside callers measure with [`NodeResult::new`].
    pub(crate) fn arrived(
        node: Node,
        grad: ArrivedGradient,
        stats: BatchStats,
        magnitude: Magnitude,
    ) -> Self {
        NodeResult {
            node,
            grad,
            stats,
            magnitude,
        }
    }

    /// A result measured now (one more pass over its gradient).
    pub fn new(node: Node, sum: GradientSum) -> Self {
        let magnitude = Magnitude::of(&sum.grad);
        NodeResult::arrived(node, ArrivedGradient::Owned(sum.grad), sum.stats, magnitude)
    }

    /// A result whose gradient a worker left in shared memory, measured now (by copying it out).
    pub fn shared(node: Node, values: Arc<dyn SharedValues>, stats: BatchStats) -> Self {
        let (_, magnitude) = values.to_vec();
        NodeResult::arrived(node, ArrivedGradient::Shared(values), stats, magnitude)
    }
}

/// The coordinator's state: parameters, optimizer, schedule, workers and the step in progress.
#[derive(Debug)]
pub struct StateMachine {
    config: StateConfig,
    tree: ReductionTree,
    params: Vec<f32>,
    opt_state: OptimizerState,
    /// The clipped update's mean gradient, kept from step to step (a fresh 2.6 MB vector a step
    /// costs its page faults and zeroing).
    clip_buffer: Vec<f32>,
    position: Position,
    totals: EpochTotals,
    phase: Phase,
    workers: BTreeMap<WorkerId, WorkerInfo>,
    next_worker: u64,
    incarnation: u64,
    /// The current epoch's visiting order of every shard.
    epoch_orders: Option<(u64, Vec<Vec<u32>>)>,
    step: Option<StepState>,
    /// A complete step whose update is ready or being applied.
    ready: Option<StepState>,
    /// Updates are kept for the driver ([`StateMachine::take_update_unless_held`] hands none out)
    /// until it has taken the snapshot it was told of (a checkpoint due, an epoch's end), so that
    /// no update has the parameters out when it copies them.
    held_for_snapshot: bool,
    /// The same, for good: the run is stopping and leaves the step in progress to its resume.
    held_for_stop: bool,
    /// The slowest node of the last completed step: the yardstick for stragglers.
    last_slowest_node: Duration,
    /// Per worker, how many steps in a row a backup finished its node first.
    overtaken: HashMap<WorkerId, u32>,
    /// Per worker, rejected results that others then computed correctly.
    strikes: HashMap<WorkerId, u32>,
    /// Names (as the workers gave them) of quarantined workers, with the reason.
    quarantined: BTreeMap<String, String>,
    /// The names of removed workers, with the step in progress when they went: a verdict that
    /// comes after a worker's removal (its accepted gradient found rewritten by the update that
    /// reads it, say) still quarantines its name. Kept until that step's update is applied.
    departed: HashMap<WorkerId, (String, u64)>,
    no_workers_since: Option<Instant>,
    /// When the last checkpoint was asked for (or the first step started): the clock of
    /// [`StateConfig::checkpoint_interval`].
    last_checkpoint: Option<Instant>,
    outputs: Vec<Output>,
}

impl StateMachine {
    /// A machine at `position` with the given parameters and optimizer state (fresh or resumed).
    /// `incarnation` distinguishes this coordinator process's worker ids from a previous one's.
    pub fn new(
        config: StateConfig,
        params: Vec<f32>,
        opt_state: OptimizerState,
        position: Position,
        totals: EpochTotals,
        incarnation: u64,
    ) -> Self {
        assert_eq!(
            params.len(),
            config.param_len,
            "parameters match the layout"
        );
        let tree = ReductionTree::new(config.plan.shards());
        let phase = if position.epoch >= config.epochs {
            Phase::Finished
        } else {
            Phase::WaitingForWorkers
        };
        StateMachine {
            config,
            tree,
            params,
            opt_state,
            clip_buffer: Vec::new(),
            position,
            totals,
            phase,
            workers: BTreeMap::new(),
            next_worker: 1,
            incarnation: incarnation & 0xff_ffff,
            epoch_orders: None,
            step: None,
            ready: None,
            held_for_snapshot: false,
            held_for_stop: false,
            last_slowest_node: Duration::ZERO,
            overtaken: HashMap::new(),
            strikes: HashMap::new(),
            quarantined: BTreeMap::new(),
            departed: HashMap::new(),
            no_workers_since: None,
            last_checkpoint: None,
            outputs: Vec::new(),
        }
    }

    pub fn params(&self) -> &[f32] {
        &self.params
    }

    pub fn optimizer_state(&self) -> &OptimizerState {
        &self.opt_state
    }

    pub fn position(&self) -> Position {
        self.position
    }

    pub fn totals(&self) -> EpochTotals {
        self.totals
    }

    pub fn phase(&self) -> &Phase {
        &self.phase
    }

    pub fn config(&self) -> &StateConfig {
        &self.config
    }

    pub fn live_workers(&self) -> usize {
        self.workers.len()
    }

    pub fn worker_name(&self, worker: WorkerId) -> Option<&str> {
        self.workers.get(&worker).map(|w| w.name.as_str())
    }

    /// Whether `shard` lies under a node `worker` has been given in the current step (queued or
    /// in flight): the only shards a worker may download.
    pub fn holds_shard(&self, worker: WorkerId, shard: u32) -> bool {
        let Some(step) = &self.step else {
            return false;
        };
        step.queued
            .get(&worker)
            .into_iter()
            .chain(step.in_flight.get(&worker))
            .flatten()
            .any(|node| (node.lo..node.hi).contains(&shard))
    }

    /// Why a worker registering as `identity` (the name it gives) was quarantined, if it was.
    pub fn quarantine_reason(&self, identity: &str) -> Option<&str> {
        self.quarantined.get(identity).map(String::as_str)
    }

    /// How many workers were quarantined in this run.
    pub fn quarantined_count(&self) -> usize {
        self.quarantined.len()
    }

    /// Takes what happened since the last call.
    pub fn drain_outputs(&mut self) -> Vec<Output> {
        std::mem::take(&mut self.outputs)
    }

    /// A worker registered. Returns its id.
    pub fn register(&mut self, name: String, now: Instant) -> WorkerId {
        let id = WorkerId(self.incarnation << 40 | self.next_worker);
        self.next_worker += 1;
        self.workers.insert(
            id,
            WorkerInfo {
                name: name.clone(),
                last_seen: now,
            },
        );
        self.no_workers_since = None;
        self.outputs.push(Output::WorkerJoined { worker: id, name });
        match self.phase {
            Phase::WaitingForWorkers if self.workers.len() >= self.config.min_workers => {
                self.phase = Phase::Training;
                self.start_step(now);
            }
            Phase::Training => {
                // Work stranded when the last worker was lost goes to the newcomer at once; the
                // newcomer gets shards of its own from the next step on.
                if let Some(step) = &mut self.step
                    && !step.orphans.is_empty()
                {
                    let orphans = std::mem::take(&mut step.orphans);
                    step.queued.entry(id).or_default().extend(orphans);
                }
            }
            _ => {}
        }
        id
    }

    /// The worker asks for work.
    pub fn next_task(&mut self, worker: WorkerId, now: Instant) -> TaskDecision {
        if !self.touch(worker, now) {
            return TaskDecision::UnknownWorker;
        }
        match self.phase {
            Phase::Finished | Phase::Failed(_) => return TaskDecision::Done,
            Phase::Training => {}
            _ => return TaskDecision::Wait,
        }
        let Some(step) = &mut self.step else {
            return TaskDecision::Wait;
        };
        let Some(nodes) = step.queued.remove(&worker).filter(|n| !n.is_empty()) else {
            return TaskDecision::Wait;
        };
        step.in_flight
            .entry(worker)
            .or_default()
            .extend(nodes.iter().copied());
        for &node in &nodes {
            step.handed_out.insert((worker, node), now);
        }
        let nodes: Vec<NodeWork> = nodes
            .into_iter()
            .map(|node| node_work(step, node))
            .collect();
        let global_step = step.global_step;
        let next_examples = self.next_examples(&nodes);
        TaskDecision::Task(Task {
            global_step,
            epoch: self.position.epoch,
            nodes,
            next_examples,
        })
    }

    /// The examples the shards of `nodes` take in the step after the current one, when it is in
    /// the same epoch (whose shard orders are at hand); empty otherwise.
    fn next_examples(&self, nodes: &[NodeWork]) -> Vec<ShardWork> {
        let plan = &self.config.plan;
        let next = self.position.step_in_epoch as usize + 1;
        let Some((_, orders)) = self
            .epoch_orders
            .as_ref()
            .filter(|(epoch, _)| *epoch == self.position.epoch)
        else {
            return Vec::new();
        };
        if next >= plan.steps_per_epoch() {
            return Vec::new();
        }
        nodes
            .iter()
            .flat_map(|work| work.node.lo..work.node.hi)
            .map(|s| ShardWork {
                shard: s,
                examples: orders[s as usize][plan.step_window(s as usize, next)].to_vec(),
            })
            .collect()
    }

    /// A worker returns node sums for `global_step`.
    pub fn submit(
        &mut self,
        worker: WorkerId,
        global_step: u64,
        results: Vec<NodeResult>,
        compute_seconds: f64,
        now: Instant,
    ) -> SubmitOutcome {
        if !self.touch(worker, now) {
            return SubmitOutcome::Ignored(format!(
                "worker {worker} is not registered (declared lost?): result ignored"
            ));
        }
        let name = self.workers[&worker].name.clone();
        let expected_len = self.config.param_len;
        let verify = self.config.verify_fraction > 0.0;
        let Some(step) = self.step.as_mut().filter(|s| s.global_step == global_step) else {
            return SubmitOutcome::Ignored(format!(
                "step {global_step} is not the step in progress: result ignored"
            ));
        };
        let mut rejected = Vec::new();
        let mut ignored = Vec::new();
        let mut accepted = Vec::new();
        let mut to_settle = Vec::new();
        for NodeResult {
            node,
            mut grad,
            stats,
            mut magnitude,
        } in results
        {
            let in_flight = step.in_flight.entry(worker).or_default();
            if step.received.contains_key(&node) {
                // A backup (or the original) was faster: same bits, nothing to do.
                in_flight.retain(|n| *n != node);
                ignored.push(format!(
                    "shards {}..{} were already computed by another worker",
                    node.lo, node.hi
                ));
                continue;
            }
            let Some(pos) = in_flight.iter().position(|n| *n == node) else {
                ignored.push(format!(
                    "shards {}..{} were not assigned to it",
                    node.lo, node.hi
                ));
                continue;
            };
            in_flight.remove(pos);
            // Under `--verify` a result is copied out (and measured again as it is): a copy to
            // verify is compared bit for bit, and any result left in place could be rewritten
            // after that comparison would have passed it. (The transport copies them already;
            // this keeps the rule for any caller.)
            if let ArrivedGradient::Shared(values) = &grad
                && verify
            {
                let (values, copied) = values.to_vec();
                (grad, magnitude) = (ArrivedGradient::Owned(values), copied);
            }
            let problem = step.result_problem(node, &stats, |bound| match &grad {
                ArrivedGradient::Owned(values) => {
                    check_measured(values, magnitude, expected_len, bound)
                }
                ArrivedGradient::Shared(values) => {
                    check_shared(&**values, magnitude, expected_len, bound)
                }
            });
            match problem {
                None => {
                    if let Some(since) = step.handed_out.get(&(worker, node)) {
                        step.slowest_node =
                            step.slowest_node.max(now.saturating_duration_since(*since));
                    }
                    let values = match grad {
                        ArrivedGradient::Owned(values) => GradientValues::Owned(values),
                        ArrivedGradient::Shared(values) => GradientValues::Shared(SharedGradient {
                            values,
                            max_abs: step.gradient_bound(node),
                            writer: worker.0,
                        }),
                    };
                    if let Some(copies) = step.verifying.get_mut(&node) {
                        let GradientValues::Owned(grad) = values else {
                            unreachable!("a copy to verify is copied out above")
                        };
                        let sum = GradientSum { grad, stats };
                        if copies.has_from(worker) {
                            ignored.push(format!(
                                "shards {}..{}: a second copy from the same worker",
                                node.lo, node.hi
                            ));
                        } else {
                            copies.add(Source::Worker(worker), sum);
                            to_settle.push(node);
                        }
                        continue;
                    }
                    step.received
                        .insert(node, ReceivedGradient { values, stats });
                    accepted.push(node);
                }
                Some(reason) => {
                    step.rejections.entry(node).or_default().insert(worker);
                    step.unconfirmed_rejections.push((node, worker));
                    self.outputs.push(Output::ResultRejected {
                        worker,
                        name: name.clone(),
                        step: global_step,
                        node,
                        reason: reason.clone(),
                    });
                    rejected.push((node, reason));
                }
            }
        }
        step.slowest_compute = step.slowest_compute.max(compute_seconds);
        for node in accepted {
            self.node_accepted(node, Source::Worker(worker));
        }
        // A rejected node is recomputed by a worker that has not failed it, or else here.
        for (node, _) in &rejected {
            let Some(step) = self.step.as_ref() else {
                break;
            };
            let failed_it = step.rejections.get(node).cloned().unwrap_or_default();
            if failed_it.len() >= REJECTIONS_BEFORE_COMPUTING_HERE {
                self.compute_here(*node);
            } else if step.verifying.contains_key(node) {
                // A verified node still needs two agreeing copies from workers that have not
                // failed it (one may already be in).
                self.find_second_copy(*node, &failed_it);
            } else {
                match self.pick_worker_avoiding(&failed_it) {
                    Some(w) => {
                        let step = self.step.as_mut().expect("checked above");
                        step.queued.entry(w).or_default().push(*node);
                    }
                    None => self.compute_here(*node),
                }
            }
        }
        for node in to_settle {
            self.settle(node);
        }
        self.try_complete_step();
        if let Some((_, reason)) = rejected.first() {
            SubmitOutcome::Rejected(reason.clone())
        } else if let Some(reason) = ignored.first() {
            SubmitOutcome::Ignored(reason.clone())
        } else {
            SubmitOutcome::Accepted
        }
    }

    /// The coordinator's own computation of a node it was asked to compute
    /// ([`Output::ComputeNode`]): trusted, so it decides the node.
    pub fn accept_own_computation(&mut self, global_step: u64, node: Node, sum: GradientSum) {
        let Some(step) = self.step.as_mut().filter(|s| s.global_step == global_step) else {
            return;
        };
        let verified = step.verifying.contains_key(&node);
        let backup = step.own_backups.contains(&node) && !step.received.contains_key(&node);
        if !verified && !backup {
            return;
        }
        let magnitude = Magnitude::of(&sum.grad);
        let problem = step.result_problem(node, &sum.stats, |bound| {
            check_measured(&sum.grad, magnitude, self.config.param_len, bound)
        });
        if let Some(problem) = problem {
            self.fail(format!(
                "training diverged: the coordinator's own computation of shards {}..{} at step \
                 {global_step} gives {problem}; lower --lr or set --clip-norm, then --resume \
                 (the last checkpoint holds the parameters before this step)",
                node.lo, node.hi
            ));
            return;
        }
        if verified {
            let copies = step.verifying.get_mut(&node).expect("checked above");
            copies.add(Source::Coordinator, sum);
            self.settle(node);
        } else {
            step.received.insert(node, sum.into());
            self.node_accepted(node, Source::Coordinator);
        }
        self.try_complete_step();
    }

    /// Decides a verified node if its copies allow it.
    fn settle(&mut self, node: Node) {
        let Some(step) = self.step.as_mut() else {
            return;
        };
        let global_step = step.global_step;
        let Some(copies) = step.verifying.get_mut(&node) else {
            return;
        };
        let coordinator_involved = copies.coordinator_asked;
        match copies.decide() {
            Decision::Wait => {}
            Decision::Arbitrate => {
                let work = node_work(step, node);
                self.outputs.push(Output::ComputeNode {
                    global_step,
                    epoch: self.position.epoch,
                    work,
                });
            }
            Decision::Accept { sum, wrong } => {
                step.verifying.remove(&node);
                step.received.insert(node, sum.into());
                self.outputs.push(Output::NodeVerified {
                    step: global_step,
                    node,
                    agreed: wrong.is_empty() && !coordinator_involved,
                });
                self.node_accepted(node, Source::Coordinator);
                for worker in wrong {
                    self.quarantine(
                        worker,
                        format!(
                            "its result for shards {}..{} at step {global_step} differs from the \
                             coordinator's own computation of them (--verify)",
                            node.lo, node.hi
                        ),
                    );
                }
            }
        }
    }

    /// Bookkeeping once `node` has its result: drop copies still queued, note a straggler
    /// overtaken by its backup, and confirm earlier rejections of the node as the rejected
    /// workers' fault.
    fn node_accepted(&mut self, node: Node, from: Source) {
        let Some(step) = self.step.as_mut() else {
            return;
        };
        for queue in step.queued.values_mut() {
            queue.retain(|n| *n != node);
        }
        let overtook = step.backups.get(&node).map(|&slow| {
            let by_other = match from {
                Source::Worker(w) => w != slow,
                Source::Coordinator => true,
            };
            (slow, by_other)
        });
        let mut confirmed = Vec::new();
        step.unconfirmed_rejections.retain(|&(n, w)| {
            let confirm = n == node && from != Source::Worker(w);
            if confirm {
                confirmed.push(w);
            }
            !confirm && n != node
        });
        if let Some((slow, overtaken)) = overtook {
            self.note_overtaken(slow, overtaken);
        }
        for worker in confirmed {
            let count = self.strikes.entry(worker).or_insert(0);
            *count += 1;
            if *count >= STRIKES_BEFORE_QUARANTINE {
                let count = *count;
                self.quarantine(
                    worker,
                    format!(
                        "{count} of its results were rejected and then computed correctly by \
                         others"
                    ),
                );
            }
        }
    }

    /// Removes `worker` for sending wrong results and refuses its name from now on. It never
    /// fails the run: its work moves to the others. A worker already removed (lost between its
    /// result's acceptance and the verdict) has its name refused too. Every other registration
    /// under the name is removed as well: a worker registers again after any failed call, before
    /// its old registration times out, so the same process may hold the name twice (and names
    /// are meant to be unique: the default is `host:pid`).
    fn quarantine(&mut self, worker: WorkerId, reason: String) {
        let live = self.workers.get(&worker).map(|info| info.name.clone());
        let Some(name) = live
            .clone()
            .or_else(|| self.departed.get(&worker).map(|(name, _)| name.clone()))
        else {
            return;
        };
        let refused = identity(&name).to_string();
        if live.is_some() || !self.quarantined.contains_key(&refused) {
            self.quarantined.insert(refused.clone(), reason.clone());
            self.strikes.remove(&worker);
            self.outputs.push(Output::WorkerQuarantined {
                worker,
                name,
                reason: reason.clone(),
            });
            self.remove_worker(worker, format!("quarantined: {reason}"));
        }
        let same_name: Vec<WorkerId> = self
            .workers
            .iter()
            .filter(|(_, info)| identity(&info.name) == refused)
            .map(|(&id, _)| id)
            .collect();
        for id in same_name {
            self.remove_worker(
                id,
                format!("registered under a name quarantined since: {reason}"),
            );
        }
    }

    /// A worker says it is alive.
    pub fn heartbeat(&mut self, worker: WorkerId, now: Instant) -> HeartbeatAnswer {
        if matches!(self.phase, Phase::Finished | Phase::Failed(_)) {
            return HeartbeatAnswer::Done;
        }
        if self.touch(worker, now) {
            HeartbeatAnswer::Known
        } else {
            HeartbeatAnswer::Unknown
        }
    }

    /// Time passes: declare silent workers lost; give up when no worker has been left too long.
    pub fn tick(&mut self, now: Instant) {
        let timeout = self.config.worker_timeout;
        let silent: Vec<WorkerId> = self
            .workers
            .iter()
            .filter(|(_, w)| now.saturating_duration_since(w.last_seen) > timeout)
            .map(|(&id, _)| id)
            .collect();
        for id in silent {
            self.remove_worker(
                id,
                format!("no heartbeat for more than {:.1}s", timeout.as_secs_f64()),
            );
        }
        self.back_up_stragglers(now);
        if self.phase == Phase::Training && self.workers.is_empty() {
            let since = *self.no_workers_since.get_or_insert(now);
            if now.saturating_duration_since(since) > self.config.no_worker_timeout {
                self.fail(format!(
                    "no worker for {:.0}s (--no-worker-timeout): stopping at step {}; start \
                     workers and rerun with --resume to continue",
                    self.config.no_worker_timeout.as_secs_f64(),
                    self.position.global_step
                ));
            }
        }
    }

    /// Removes a worker (lost, or failing) and moves its unfinished work to the others.
    pub fn remove_worker(&mut self, worker: WorkerId, reason: String) {
        let Some(info) = self.workers.remove(&worker) else {
            return;
        };
        self.departed
            .insert(worker, (info.name.clone(), self.position.global_step));
        let mut moved = Vec::new();
        if let Some(step) = &mut self.step {
            moved.extend(step.queued.remove(&worker).unwrap_or_default());
            moved.extend(step.in_flight.remove(&worker).unwrap_or_default());
        }
        moved.sort();
        // A verified node needs copies from two workers: find another, or compute it here.
        let verifying: Vec<Node> = self.step.as_ref().map_or_else(Vec::new, |step| {
            moved
                .iter()
                .copied()
                .filter(|n| step.verifying.contains_key(n))
                .collect()
        });
        moved.retain(|n| !verifying.contains(n));
        for node in verifying {
            let mut excluded = self.failed(node);
            excluded.insert(worker);
            self.find_second_copy(node, &excluded);
        }
        if let Some(step) = &self.step {
            // A node already received, or held or queued by another worker (a backup), needs no
            // further copy.
            let elsewhere = |n: &Node| {
                step.received.contains_key(n)
                    || step
                        .in_flight
                        .values()
                        .chain(step.queued.values())
                        .any(|v| v.contains(n))
            };
            moved.retain(|n| !elsewhere(n));
        }
        for &node in &moved {
            // Preferably a worker that has not failed the node.
            let target = self
                .pick_worker_avoiding(&self.failed(node))
                .or_else(|| self.pick_worker(None));
            let step = self.step.as_mut().expect("moved nodes imply a step");
            match target {
                Some(w) => step.queued.entry(w).or_default().push(node),
                None => step.orphans.push(node),
            }
        }
        self.outputs.push(Output::WorkerLost {
            worker,
            name: info.name,
            reason,
            moved,
        });
    }

    /// Verified `node` lost a copy (its worker left, or sent an invalid result): make sure two
    /// copies can still arrive, from workers outside `excluded` that have neither sent nor hold
    /// one, or else from the coordinator.
    fn find_second_copy(&mut self, node: Node, excluded: &BTreeSet<WorkerId>) {
        let Some(step) = self.step.as_ref() else {
            return;
        };
        let Some(copies) = step.verifying.get(&node) else {
            return;
        };
        if copies.coordinator_asked {
            return;
        }
        let holds = |w: &WorkerId| {
            step.in_flight
                .get(w)
                .into_iter()
                .chain(step.queued.get(w))
                .any(|nodes| nodes.contains(&node))
        };
        let involved: BTreeSet<WorkerId> = copies
            .workers()
            .chain(self.workers.keys().copied().filter(holds))
            .filter(|w| !excluded.contains(w))
            .collect();
        if involved.len() >= 2 {
            return;
        }
        let avoid: BTreeSet<WorkerId> = involved.union(excluded).copied().collect();
        match self.pick_worker_avoiding(&avoid) {
            Some(w) => {
                let step = self.step.as_mut().expect("checked above");
                step.queued.entry(w).or_default().push(node);
            }
            None => self.compute_here(node),
        }
    }

    /// The coordinator as the backup of a straggler's `node` when no worker is left to take it:
    /// a verified node gets the coordinator's deciding copy, any other node a plain copy (the
    /// first valid result is used, so a straggler that delivers first is not overtaken).
    fn back_up_here(&mut self, node: Node) {
        let Some(step) = self.step.as_mut() else {
            return;
        };
        if step.verifying.contains_key(&node) {
            self.compute_here(node);
            return;
        }
        if step.own_backups.insert(node) {
            let work = node_work(step, node);
            self.outputs.push(Output::ComputeNode {
                global_step: step.global_step,
                epoch: self.position.epoch,
                work,
            });
        }
    }

    /// Asks the driver to compute `node` of the current step here (once): its copy decides.
    fn compute_here(&mut self, node: Node) {
        let Some(step) = self.step.as_mut() else {
            return;
        };
        let copies = step.verifying.entry(node).or_default();
        if copies.coordinator_asked {
            return;
        }
        copies.coordinator_asked = true;
        let work = node_work(step, node);
        self.outputs.push(Output::ComputeNode {
            global_step: step.global_step,
            epoch: self.position.epoch,
            work,
        });
    }

    /// The held-out evaluation of the epoch that just ended is done: go on or finish.
    pub fn finish_evaluation(&mut self, now: Instant) {
        if self.phase != Phase::Evaluating {
            return;
        }
        // The epoch's checkpoint is written after the evaluation: the clock starts again there.
        self.last_checkpoint = Some(now);
        self.totals = EpochTotals::default();
        if self.position.epoch >= self.config.epochs {
            self.phase = Phase::Finished;
            self.outputs.push(Output::Finished);
        } else {
            self.phase = Phase::Training;
            self.start_step(now);
        }
    }

    fn touch(&mut self, worker: WorkerId, now: Instant) -> bool {
        match self.workers.get_mut(&worker) {
            Some(info) => {
                info.last_seen = now;
                true
            }
            None => false,
        }
    }

    /// Stops the run for a reason found outside the machine (it checkpoints the last applied step).
    pub fn stop(&mut self, reason: String) {
        self.fail(reason);
    }

    fn fail(&mut self, reason: String) {
        self.phase = Phase::Failed(reason.clone());
        self.step = None;
        self.outputs.push(Output::Failed(reason));
    }

    /// The workers whose result for `node` in the current step was rejected.
    fn failed(&self, node: Node) -> BTreeSet<WorkerId> {
        self.step
            .as_ref()
            .and_then(|step| step.rejections.get(&node).cloned())
            .unwrap_or_default()
    }

    /// The live worker with the least work in the current step, avoiding `avoid` if possible.
    fn pick_worker(&self, avoid: Option<WorkerId>) -> Option<WorkerId> {
        self.pick_worker_avoiding(&avoid.into_iter().collect())
            .or_else(|| self.workers.keys().next().copied())
    }

    /// The live worker with the least work in the current step among those not in `avoid`.
    fn pick_worker_avoiding(&self, avoid: &BTreeSet<WorkerId>) -> Option<WorkerId> {
        let load = |w: &WorkerId| -> u32 {
            self.step.as_ref().map_or(0, |s| {
                let count = |m: &BTreeMap<WorkerId, Vec<Node>>| {
                    m.get(w).map_or(0, |n| n.iter().map(Node::len).sum::<u32>())
                };
                count(&s.queued) + count(&s.in_flight)
            })
        };
        self.workers
            .keys()
            .filter(|w| !avoid.contains(w))
            .min_by_key(|w| (load(w), **w))
            .copied()
    }

    fn start_step(&mut self, now: Instant) {
        self.last_checkpoint.get_or_insert(now);
        let plan = &self.config.plan;
        let epoch = self.position.epoch;
        if self.epoch_orders.as_ref().map(|(e, _)| *e) != Some(epoch) {
            let orders = (0..plan.shards())
                .map(|s| plan.epoch_order(epoch, s))
                .collect();
            self.epoch_orders = Some((epoch, orders));
        }
        let orders = &self.epoch_orders.as_ref().expect("just set").1;
        let step_index = self.position.step_in_epoch as usize;
        let examples = (0..plan.shards())
            .map(|s| orders[s][plan.step_window(s, step_index)].to_vec())
            .collect();
        let workers: Vec<WorkerId> = self.workers.keys().copied().collect();
        let mut queued = BTreeMap::new();
        let mut orphans = Vec::new();
        if workers.is_empty() {
            orphans.push(self.tree.root());
        }
        let blocks = tree_blocks(&self.tree, &workers);
        for (&worker, &node) in &blocks {
            queued.insert(worker, vec![node]);
        }
        // Verified nodes get a second copy on the next worker in order (each worker verifies
        // one neighbour, so the load stays even), or from the coordinator when alone.
        let mut verifying = HashMap::new();
        let mut compute_here = Vec::new();
        let global_step = self.position.global_step;
        for (i, (&owner, &node)) in blocks.iter().enumerate() {
            let (secret, fraction) = (self.config.verify_secret, self.config.verify_fraction);
            if !verification::selected(secret, fraction, global_step, node) {
                continue;
            }
            let mut copies = Copies::default();
            let verifier = workers[(i + 1) % workers.len()];
            if verifier == owner {
                copies.coordinator_asked = true;
                compute_here.push(node);
            } else {
                queued.entry(verifier).or_default().push(node);
            }
            verifying.insert(node, copies);
        }
        self.step = Some(StepState {
            global_step: self.position.global_step,
            examples,
            queued,
            in_flight: BTreeMap::new(),
            orphans,
            received: HashMap::new(),
            rejections: HashMap::new(),
            unconfirmed_rejections: Vec::new(),
            verifying,
            handed_out: HashMap::new(),
            backups: HashMap::new(),
            own_backups: BTreeSet::new(),
            overtaken_now: BTreeSet::new(),
            slowest_node: Duration::ZERO,
            started: now,
            slowest_compute: 0.0,
            update_taken: false,
        });
        let step = self.step.as_ref().expect("just set");
        for node in compute_here {
            self.outputs.push(Output::ComputeNode {
                global_step,
                epoch,
                work: node_work(step, node),
            });
        }
    }

    /// When the received nodes cover the tree, the step's update is ready: hand it to the driver.
    fn try_complete_step(&mut self) {
        let Some(step) = &self.step else { return };
        let covered: u32 = step.received.keys().map(Node::len).sum();
        if covered < self.tree.root().hi {
            return;
        }
        let step = self.step.take().expect("checked above");
        // "Overtaken steps in a row": a step without being overtaken starts the count again.
        self.overtaken
            .retain(|worker, _| step.overtaken_now.contains(worker));
        self.phase = Phase::Updating;
        self.outputs.push(Output::StepReady {
            global_step: step.global_step,
        });
        self.ready = Some(step);
    }

    /// The update of a completed step, with the parameters and optimizer state moved into it:
    /// the driver runs it off the async runtime and hands the result to [`Self::finish_update`].
    /// `None` unless [`Output::StepReady`] was emitted and not yet taken.
    pub fn take_update(&mut self) -> Option<UpdateJob> {
        let step = self.ready.as_mut()?;
        if step.update_taken {
            return None;
        }
        step.update_taken = true;
        Some(UpdateJob {
            global_step: step.global_step,
            received: std::mem::take(&mut step.received),
            tree: self.tree,
            optimizer: self.config.optimizer.clone(),
            clip_norm: self.config.clip_norm,
            params: std::mem::take(&mut self.params),
            clip_buffer: std::mem::take(&mut self.clip_buffer),
            // An empty placeholder while the job holds the real state (nothing reads it then).
            opt_state: std::mem::replace(
                &mut self.opt_state,
                OptimizerState {
                    step: 0,
                    moments: Moments::Sgd {
                        momentum_buffer: None,
                    },
                },
            ),
        })
    }

    /// [`StateMachine::take_update`] of step `global_step` only (the one a [`Output::StepReady`]
    /// named): a later step's update may be held back for a snapshot not yet taken.
    pub fn take_update_of(&mut self, global_step: u64) -> Option<UpdateJob> {
        if self.ready.as_ref()?.global_step != global_step {
            return None;
        }
        self.take_update()
    }

    /// The parameters of step `global_step` while it is in progress (its nodes still being
    /// computed, so no update has them out); `None` once it completed.
    pub fn params_of_step(&self, global_step: u64) -> Option<&[f32]> {
        let step = self.step.as_ref()?;
        (step.global_step == global_step).then_some(&self.params[..])
    }

    /// [`StateMachine::take_update`] for a thread other than the driver's (the mailbox thread that
    /// delivered the step's last result, which then runs the update at once instead of waking
    /// the driver): `None` while updates are held for a snapshot or a stop.
    pub fn take_update_unless_held(&mut self) -> Option<UpdateJob> {
        if self.held_for_snapshot || self.held_for_stop {
            return None;
        }
        self.take_update()
    }

    /// Whether an update was handed out and has not come back: the parameters and the optimizer
    /// state are in the job then, not here, so nothing may copy them.
    pub fn update_in_flight(&self) -> bool {
        self.ready.as_ref().is_some_and(|step| step.update_taken)
    }

    /// The driver took the snapshot it was told of: other threads may take updates again.
    pub fn snapshot_taken(&mut self) {
        self.held_for_snapshot = false;
    }

    /// The run is stopping: no thread but the driver takes an update from now on (and the driver
    /// takes none), so the stop's checkpoint holds the last applied step.
    pub fn hold_updates_for_stop(&mut self) {
        self.held_for_stop = true;
    }

    /// Takes back the parameters of an [`UpdateJob`] and moves on: the next step, or the epoch's
    /// end. `update_seconds` is how long the job took (measured by the caller: no clock here).
    pub fn finish_update(&mut self, done: UpdateDone, update_seconds: f64, now: Instant) {
        debug_assert_eq!(
            self.ready.as_ref().map(|step| step.global_step),
            Some(done.global_step)
        );
        let Some(step) = self.ready.take() else {
            return;
        };
        self.last_slowest_node = step.slowest_node;
        self.params = done.params;
        self.opt_state = done.opt_state;
        self.clip_buffer = done.clip_buffer;
        for writer in done.rewritten {
            self.quarantine(
                WorkerId(writer),
                format!(
                    "its gradient for step {} changed in shared memory after it was accepted \
                     (values not finite or beyond the bound the update checks them against \
                     again; they were used as zeros)",
                    step.global_step
                ),
            );
        }
        // Every verdict on this step's results is in: workers removed by now have none to come.
        self.departed
            .retain(|_, (_, removed_at)| *removed_at > step.global_step);
        // The run failed while the update ran (a node the coordinator could not compute, say):
        // the parameters are back for its checkpoint, and nothing moves on.
        if matches!(self.phase, Phase::Failed(_)) {
            return;
        }
        let stats = match done.outcome {
            Ok(stats) => stats,
            Err(reason) => {
                self.fail(format!("step {}: {reason}", step.global_step));
                return;
            }
        };
        self.phase = Phase::Training;
        self.totals.steps += 1;
        self.totals.stats += stats;
        let step_seconds = now.saturating_duration_since(step.started).as_secs_f64();
        self.totals.step_seconds += step_seconds;
        self.totals.compute_seconds += step.slowest_compute;
        self.totals.update_seconds += update_seconds;
        self.position.global_step += 1;
        self.position.step_in_epoch += 1;
        self.outputs.push(Output::StepApplied {
            position: self.position,
            examples: stats.examples,
            elbo: stats.elbo / stats.examples.max(1) as f64,
            seconds: step_seconds,
        });
        let epoch_done = self.position.step_in_epoch as usize >= self.config.plan.steps_per_epoch();
        if epoch_done {
            let epoch = self.position.epoch;
            self.position.epoch += 1;
            self.position.step_in_epoch = 0;
            self.phase = Phase::Evaluating;
            // The driver evaluates these parameters and checkpoints them.
            self.held_for_snapshot = true;
            // The driver checkpoints after the evaluation, so a resumed run never skips one.
            self.last_checkpoint = Some(now);
            self.outputs.push(Output::EpochEnded {
                epoch,
                totals: self.totals,
            });
        } else {
            let by_steps = self.config.checkpoint_every > 0
                && self
                    .position
                    .global_step
                    .is_multiple_of(self.config.checkpoint_every);
            let by_clock = self.config.checkpoint_interval.is_some_and(|interval| {
                self.last_checkpoint
                    .is_some_and(|last| now.saturating_duration_since(last) >= interval)
            });
            if by_steps || by_clock {
                self.last_checkpoint = Some(now);
                self.held_for_snapshot = true;
                self.outputs.push(Output::CheckpointDue);
            }
            self.start_step(now);
        }
    }

    /// Runs a ready update in place (tests and single-threaded callers).
    pub fn apply_ready_update(&mut self, now: Instant) {
        if let Some(job) = self.take_update() {
            self.finish_update(job.run(None), 0.0, now);
        }
    }
}

/// The name a worker gave, without the peer address the service appends (`name (peer)`): what
/// quarantine remembers, since a reconnecting worker keeps its name but not its port.
fn identity(name: &str) -> &str {
    name.rsplit_once(" (").map_or(name, |(given, _)| given)
}

/// A node's work description: its shards and their examples this step.
fn node_work(step: &StepState, node: Node) -> NodeWork {
    NodeWork {
        node,
        shards: (node.lo..node.hi)
            .map(|s| ShardWork {
                shard: s,
                examples: step.examples[s as usize].clone(),
            })
            .collect(),
    }
}

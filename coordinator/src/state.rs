//! The coordinator's state machine. No I/O and no clock: time comes in as arguments, and what
//! the outside world must do (evaluate, checkpoint, log) comes out as [`Output`]s. Every tricky
//! case (a worker lost mid-step, a late or duplicate result, a poisoned gradient) is a plain unit
//! test with no network.
//!
//! A step: the step's examples are fixed by the [`ShardPlan`]; live workers each get one tree
//! node and are asked for its sum. When the received nodes cover the tree the machine emits
//! [`Output::StepReady`] and hands the update out ([`StateMachine::take_update`]): the driver sums
//! the tree in its fixed order (docs/design.md §2), divides by the step's example count, steps the
//! optimizer off the async runtime, and hands the parameters back
//! ([`StateMachine::finish_update`]). Which worker computed what never changes the bits, so a lost
//! worker's nodes simply move to a survivor.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use common::model::BatchStats;
use common::optim::{Moments, OptimizerConfig, OptimizerState, clip_grad_norm};
use common::train::{GradientSum, Node, ReductionTree, ShardPlan, check_gradient};
use rayon::prelude::*;

use crate::assignment::tree_blocks;

/// A worker's id within this coordinator's lifetime. Ids carry an incarnation prefix so a worker
/// left over from a previous coordinator process is never mistaken for a new one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkerId(pub u64);

impl std::fmt::Display for WorkerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:x}", self.0)
    }
}

/// How many times one node's result may be rejected before the run stops: a gradient that is
/// non-finite on several workers means training diverged, not that a worker is faulty.
const MAX_REJECTIONS_PER_NODE: u32 = 3;

/// A node held this many times longer than the slowest node of the previous step (and at least
/// [`STRAGGLER_MIN`]) gets a backup copy on another worker: whichever result arrives first is
/// used, and both are the same bits. A worker that heartbeats but never finishes cannot stall
/// the run this way.
const STRAGGLER_FACTOR: f64 = 10.0;
const STRAGGLER_MIN: Duration = Duration::from_secs(1);
/// The limit before any step has completed in this process: the first step includes fetching
/// shard data, whose time no completed step tells yet.
const STRAGGLER_FIRST: Duration = Duration::from_secs(30);
/// A worker whose nodes were finished by backups this many steps in a row is removed; it may
/// register again.
const MAX_OVERTAKEN: u32 = 3;

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
    /// Ask for a checkpoint every this many steps (0: only at epoch ends).
    pub checkpoint_every: u64,
    pub param_len: usize,
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
    },
    /// The epoch's last step was applied: evaluate, record, then call `finish_evaluation`.
    EpochEnded {
        epoch: u64,
        totals: EpochTotals,
    },
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
    received: HashMap<Node, GradientSum>,
    rejections: HashMap<Node, u32>,
    /// When each worker was handed each node it holds.
    handed_out: HashMap<(WorkerId, Node), Instant>,
    /// Nodes given a backup copy, with the worker that was too slow with them.
    backups: HashMap<Node, WorkerId>,
    /// The slowest time from hand-out to an accepted result in this step.
    slowest_node: Duration,
    started: Instant,
    slowest_compute: f64,
    /// Whether [`StateMachine::take_update`] has handed this (complete) step's update out.
    update_taken: bool,
}

/// The coordinator's state: parameters, optimizer, schedule, workers and the step in progress.
#[derive(Debug)]
pub struct StateMachine {
    config: StateConfig,
    tree: ReductionTree,
    params: Vec<f32>,
    opt_state: OptimizerState,
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
    /// The slowest node of the last completed step: the yardstick for stragglers.
    last_slowest_node: Duration,
    /// Per worker, how many steps in a row a backup finished its node first.
    overtaken: HashMap<WorkerId, u32>,
    no_workers_since: Option<Instant>,
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
            position,
            totals,
            phase,
            workers: BTreeMap::new(),
            next_worker: 1,
            incarnation: incarnation & 0xff_ffff,
            epoch_orders: None,
            step: None,
            ready: None,
            last_slowest_node: Duration::ZERO,
            overtaken: HashMap::new(),
            no_workers_since: None,
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
        let nodes = nodes
            .into_iter()
            .map(|node| NodeWork {
                node,
                shards: (node.lo..node.hi)
                    .map(|s| ShardWork {
                        shard: s,
                        examples: step.examples[s as usize].clone(),
                    })
                    .collect(),
            })
            .collect();
        TaskDecision::Task(Task {
            global_step: step.global_step,
            epoch: self.position.epoch,
            nodes,
        })
    }

    /// A worker returns node sums for `global_step`.
    pub fn submit(
        &mut self,
        worker: WorkerId,
        global_step: u64,
        results: Vec<(Node, GradientSum)>,
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
        let Some(step) = self.step.as_mut().filter(|s| s.global_step == global_step) else {
            return SubmitOutcome::Ignored(format!(
                "step {global_step} is not the step in progress: result ignored"
            ));
        };
        let mut rejected = Vec::new();
        let mut ignored = Vec::new();
        let mut failed = None;
        let mut overtook = Vec::new();
        for (node, sum) in results {
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
            let expected_examples: usize = (node.lo..node.hi)
                .map(|s| step.examples[s as usize].len())
                .sum();
            let problem = check_gradient(&sum.grad, expected_len).err().or_else(|| {
                (sum.stats.examples != expected_examples as u64).then(|| {
                    format!(
                        "result covers {} examples, the step has {expected_examples} for these \
                         shards",
                        sum.stats.examples
                    )
                })
            });
            in_flight.remove(pos);
            match problem {
                None => {
                    step.received.insert(node, sum);
                    if let Some(since) = step.handed_out.get(&(worker, node)) {
                        step.slowest_node =
                            step.slowest_node.max(now.saturating_duration_since(*since));
                    }
                    // Copies still waiting to be taken are no longer needed.
                    for queue in step.queued.values_mut() {
                        queue.retain(|n| *n != node);
                    }
                    if let Some(slow) = step.backups.get(&node) {
                        overtook.push((*slow, *slow != worker));
                    }
                }
                Some(reason) => {
                    let count = step.rejections.entry(node).or_insert(0);
                    *count += 1;
                    if *count >= MAX_REJECTIONS_PER_NODE {
                        failed = Some(format!(
                            "the result for shards {}..{} at step {global_step} was rejected {} \
                             times, last from worker {worker} ({name}): {reason}. If values are \
                             not finite on several workers, training diverged: lower --lr or \
                             set --clip-norm",
                            node.lo, node.hi, count
                        ));
                    }
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
        for (slow, overtaken) in overtook {
            self.note_overtaken(slow, overtaken);
        }
        if let Some(reason) = failed {
            self.fail(reason);
            return SubmitOutcome::Rejected(rejected[0].1.clone());
        }
        // A rejected node is recomputed, by another worker where there is one.
        for (node, _) in &rejected {
            let target = self.pick_worker(Some(worker));
            let step = self.step.as_mut().expect("step in progress");
            match target {
                Some(w) => step.queued.entry(w).or_default().push(*node),
                None => step.orphans.push(*node),
            }
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

    /// Gives every node held longer than the straggler limit a backup copy on another worker.
    fn back_up_stragglers(&mut self, now: Instant) {
        if self.phase != Phase::Training {
            return;
        }
        let limit = if self.last_slowest_node.is_zero() {
            STRAGGLER_FIRST
        } else {
            STRAGGLER_MIN.max(self.last_slowest_node.mul_f64(STRAGGLER_FACTOR))
        };
        let Some(step) = &self.step else { return };
        // Nodes handed out count from their hand-out, nodes never asked for from the step's start
        // (a worker that heartbeats but stopped asking for work).
        let held = step
            .in_flight
            .iter()
            .chain(&step.queued)
            .flat_map(|(&w, nodes)| {
                nodes.iter().map(move |&n| {
                    let since = step.handed_out.get(&(w, n)).unwrap_or(&step.started);
                    (w, n, now.saturating_duration_since(*since))
                })
            });
        let late: Vec<(WorkerId, Node, Duration)> = held
            .filter(|(_, n, held)| {
                *held > limit && !step.backups.contains_key(n) && !step.received.contains_key(n)
            })
            .collect();
        for (slow, node, held) in late {
            let Some(backup) = self.pick_worker(Some(slow)).filter(|b| *b != slow) else {
                continue;
            };
            let step = self.step.as_mut().expect("checked above");
            step.queued.entry(backup).or_default().push(node);
            step.backups.insert(node, slow);
            self.outputs.push(Output::NodeBackedUp {
                slow,
                name: self
                    .workers
                    .get(&slow)
                    .map_or_else(String::new, |w| w.name.clone()),
                node,
                held_seconds: held.as_secs_f64(),
                backup,
            });
        }
    }

    /// A backed-up node's result arrived: from a backup (`overtaken`) or from the slow worker.
    fn note_overtaken(&mut self, slow: WorkerId, overtaken: bool) {
        if !overtaken {
            self.overtaken.remove(&slow);
            return;
        }
        let count = self.overtaken.entry(slow).or_insert(0);
        *count += 1;
        if *count >= MAX_OVERTAKEN {
            self.overtaken.remove(&slow);
            self.remove_worker(
                slow,
                format!(
                    "it held its work while others finished it, {MAX_OVERTAKEN} steps in a row \
                     (heartbeating but not computing?)"
                ),
            );
        }
    }

    /// Removes a worker (lost, or failing) and moves its unfinished work to the others.
    pub fn remove_worker(&mut self, worker: WorkerId, reason: String) {
        let Some(info) = self.workers.remove(&worker) else {
            return;
        };
        let mut moved = Vec::new();
        if let Some(step) = &mut self.step {
            moved.extend(step.queued.remove(&worker).unwrap_or_default());
            moved.extend(step.in_flight.remove(&worker).unwrap_or_default());
        }
        moved.sort();
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
            let target = self.pick_worker(None);
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

    /// The held-out evaluation of the epoch that just ended is done: go on or finish.
    pub fn finish_evaluation(&mut self, now: Instant) {
        if self.phase != Phase::Evaluating {
            return;
        }
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

    fn fail(&mut self, reason: String) {
        self.phase = Phase::Failed(reason.clone());
        self.step = None;
        self.outputs.push(Output::Failed(reason));
    }

    /// The live worker with the least work in the current step, avoiding `avoid` if possible.
    fn pick_worker(&self, avoid: Option<WorkerId>) -> Option<WorkerId> {
        let load = |w: &WorkerId| -> u32 {
            self.step.as_ref().map_or(0, |s| {
                let count = |m: &BTreeMap<WorkerId, Vec<Node>>| {
                    m.get(w).map_or(0, |n| n.iter().map(Node::len).sum::<u32>())
                };
                count(&s.queued) + count(&s.in_flight)
            })
        };
        let candidates: Vec<&WorkerId> = self.workers.keys().collect();
        candidates
            .iter()
            .filter(|w| Some(***w) != avoid)
            .min_by_key(|w| (load(w), ***w))
            .or_else(|| candidates.first())
            .map(|w| **w)
    }

    fn start_step(&mut self, now: Instant) {
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
        for (worker, node) in tree_blocks(&self.tree, &workers) {
            queued.insert(worker, vec![node]);
        }
        self.step = Some(StepState {
            global_step: self.position.global_step,
            examples,
            queued,
            in_flight: BTreeMap::new(),
            orphans,
            received: HashMap::new(),
            rejections: HashMap::new(),
            handed_out: HashMap::new(),
            backups: HashMap::new(),
            slowest_node: Duration::ZERO,
            started: now,
            slowest_compute: 0.0,
            update_taken: false,
        });
    }

    /// When the received nodes cover the tree, the step's update is ready: hand it to the driver.
    fn try_complete_step(&mut self) {
        let Some(step) = &self.step else { return };
        let covered: u32 = step.received.keys().map(Node::len).sum();
        if covered < self.tree.root().hi {
            return;
        }
        let step = self.step.take().expect("checked above");
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

    /// Takes back the parameters of an [`UpdateJob`] and moves on: the next step, or the epoch's
    /// end. `update_seconds` is how long the job took (measured by the caller: no clock here).
    pub fn finish_update(&mut self, done: UpdateDone, update_seconds: f64, now: Instant) {
        let Some(step) = self.ready.take() else {
            return;
        };
        debug_assert_eq!(step.global_step, done.global_step);
        self.last_slowest_node = step.slowest_node;
        self.params = done.params;
        self.opt_state = done.opt_state;
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
        self.totals.step_seconds += now.saturating_duration_since(step.started).as_secs_f64();
        self.totals.compute_seconds += step.slowest_compute;
        self.totals.update_seconds += update_seconds;
        self.position.global_step += 1;
        self.position.step_in_epoch += 1;
        self.outputs.push(Output::StepApplied {
            position: self.position,
            examples: stats.examples,
            elbo: stats.elbo / stats.examples.max(1) as f64,
        });
        let epoch_done = self.position.step_in_epoch as usize >= self.config.plan.steps_per_epoch();
        if epoch_done {
            let epoch = self.position.epoch;
            self.position.epoch += 1;
            self.position.step_in_epoch = 0;
            self.phase = Phase::Evaluating;
            // The driver checkpoints after the evaluation, so a resumed run never skips one.
            self.outputs.push(Output::EpochEnded {
                epoch,
                totals: self.totals,
            });
        } else {
            if self.config.checkpoint_every > 0
                && self
                    .position
                    .global_step
                    .is_multiple_of(self.config.checkpoint_every)
            {
                self.outputs.push(Output::CheckpointDue);
            }
            self.start_step(now);
        }
    }

    /// Runs a ready update in place (tests and single-threaded callers).
    pub fn apply_ready_update(&mut self, now: Instant) {
        if let Some(job) = self.take_update() {
            self.finish_update(job.run(), 0.0, now);
        }
    }
}

/// A completed step's update, detached from the state machine so it can run on other threads
/// while heartbeats and long polls go on: the tree sum of the received nodes in the fixed order
/// (docs/design.md §2), division by the step's example count, optional clipping, the optimizer.
#[derive(Debug)]
pub struct UpdateJob {
    pub global_step: u64,
    received: HashMap<Node, GradientSum>,
    tree: ReductionTree,
    optimizer: OptimizerConfig,
    clip_norm: Option<f64>,
    params: Vec<f32>,
    opt_state: OptimizerState,
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
}

impl UpdateJob {
    /// CPU-heavy and pure: runs on whatever thread calls it (rayon inside for long vectors).
    pub fn run(self) -> UpdateDone {
        let UpdateJob {
            global_step,
            received,
            tree,
            optimizer,
            clip_norm,
            mut params,
            mut opt_state,
        } = self;
        let mut spent = Vec::new();
        let outcome = (|| {
            let sum = tree
                .evaluate_root_with(received, &mut |s: GradientSum| spent.push(s.grad))
                .map_err(|e| e.to_string())?;
            let n = sum.stats.examples.max(1) as f32;
            let mut grad = sum.grad;
            let stepped = match clip_norm {
                // The mean gradient is divided inside the optimizer's pass (same bits).
                None => optimizer.step_scaled(&mut params, &grad, n, &mut opt_state),
                Some(max) => {
                    // Elementwise, so any split across threads gives the same bits.
                    grad.par_chunks_mut(1 << 14)
                        .for_each(|chunk| chunk.iter_mut().for_each(|g| *g /= n));
                    clip_grad_norm(&mut grad, max);
                    optimizer.step(&mut params, &grad, &mut opt_state)
                }
            };
            stepped.map_err(|e| format!("optimizer: {e}"))?;
            spent.push(grad);
            Ok(sum.stats)
        })();
        UpdateDone {
            global_step,
            params,
            opt_state,
            outcome,
            spent,
        }
    }
}

//! The coordinator's state machine, driven directly: no network, no clock. Workers are simulated
//! by a deterministic function of the examples, summed along the reduction tree as a real worker
//! does, so every scenario can be compared bit for bit with an undisturbed single-worker run.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::optim::{OptimizerConfig, clip_grad_norm};
use common::train::{GradientSum, Magnitude, Node, ReductionTree, ShardPlan, SharedValues};
use coordinator::state::{
    EpochTotals, HeartbeatAnswer, NodeResult, Output, Phase, Position, ShardWork, StateConfig,
    StateMachine, SubmitOutcome, Task, TaskDecision, WorkerId,
};

const PARAMS: usize = 8;
const SHARDS: usize = 8;

fn config(min_workers: usize) -> StateConfig {
    StateConfig {
        plan: ShardPlan::new(200, SHARDS, 16, 7).unwrap(),
        epochs: 2,
        optimizer: OptimizerConfig::adam(0.01),
        clip_norm: None,
        min_workers,
        worker_timeout: Duration::from_secs(3),
        no_worker_timeout: Duration::from_secs(10),
        checkpoint_every: 5,
        checkpoint_interval: None,
        param_len: PARAMS,
        verify_fraction: 0.0,
        verify_secret: 0,
    }
}

fn machine(min_workers: usize) -> StateMachine {
    machine_with(config(min_workers))
}

/// A fresh machine for `cfg`: every parameter 0.5, the optimizer's initial state, step 0.
fn machine_with(cfg: StateConfig) -> StateMachine {
    let state = cfg.optimizer.init_state(PARAMS);
    StateMachine::new(
        cfg,
        vec![0.5; PARAMS],
        state,
        Position::default(),
        EpochTotals::default(),
        1,
    )
}

/// What a worker would send: each shard's sum over its examples of a function of the example and
/// the parameters, then summed along the tree.
fn compute(task: &Task, params: &[f32]) -> Vec<(Node, GradientSum)> {
    let tree = ReductionTree::new(SHARDS);
    task.nodes
        .iter()
        .map(|work| {
            let leaves = work
                .shards
                .iter()
                .map(|s| {
                    let mut sum = GradientSum::zeros(PARAMS);
                    for &e in &s.examples {
                        for (j, g) in sum.grad.iter_mut().enumerate() {
                            *g += (e as f32 * 0.37 + j as f32).sin() * params[j] + 0.1;
                        }
                        sum.stats.examples += 1;
                        sum.stats.elbo += -(e as f64) * 1e-3;
                    }
                    sum
                })
                .collect();
            (work.node, tree.sum_leaves(work.node, leaves))
        })
        .collect()
}

/// Submits like a worker, then applies the step's update if it became ready, as the driver does.
fn submit(
    sm: &mut StateMachine,
    worker: WorkerId,
    step: u64,
    results: Vec<(Node, GradientSum)>,
    compute_seconds: f64,
    now: Instant,
) -> SubmitOutcome {
    let results = results
        .into_iter()
        .map(|(node, sum)| NodeResult::new(node, sum))
        .collect();
    let outcome = sm.submit(worker, step, results, compute_seconds, now);
    sm.apply_ready_update(now);
    outcome
}

/// Runs to the end, with `hook` called before each worker's turn to inject trouble.
fn run(
    sm: &mut StateMachine,
    workers: &mut Vec<WorkerId>,
    now: &mut Instant,
    mut hook: impl FnMut(&mut StateMachine, &mut Vec<WorkerId>, &mut Instant, u64),
) -> Vec<Output> {
    let mut outputs = Vec::new();
    for _ in 0..10_000 {
        match sm.phase() {
            Phase::Finished | Phase::Failed(_) => break,
            Phase::Evaluating => sm.finish_evaluation(*now),
            _ => {}
        }
        let step = sm.position().global_step;
        hook(sm, workers, now, step);
        for w in workers.clone() {
            if let TaskDecision::Task(task) = sm.next_task(w, *now) {
                let results = compute(&task, sm.params());
                submit(sm, w, task.global_step, results, 0.01, *now);
            }
        }
        outputs.extend(sm.drain_outputs());
    }
    outputs.extend(sm.drain_outputs());
    outputs
}

fn reference_params() -> Vec<u32> {
    let mut sm = machine(1);
    let now = &mut Instant::now();
    let mut workers = vec![sm.register("solo".into(), *now)];
    run(&mut sm, &mut workers, now, |_, _, _, _| {});
    assert_eq!(*sm.phase(), Phase::Finished);
    bits(sm.params())
}

fn bits(p: &[f32]) -> Vec<u32> {
    p.iter().map(|x| x.to_bits()).collect()
}

fn start(n: usize) -> (StateMachine, Vec<WorkerId>, Instant) {
    let mut sm = machine(n);
    let now = Instant::now();
    let workers = (0..n).map(|i| sm.register(format!("w{i}"), now)).collect();
    (sm, workers, now)
}

#[test]
fn any_number_of_workers_gives_the_same_bits() {
    let reference = reference_params();
    for n in 2..=5 {
        let (mut sm, mut workers, mut now) = start(n);
        let outputs = run(&mut sm, &mut workers, &mut now, |_, _, _, _| {});
        assert_eq!(bits(sm.params()), reference, "{n} workers");
        let epochs = outputs
            .iter()
            .filter(|o| matches!(o, Output::EpochEnded { .. }))
            .count();
        assert_eq!(epochs, 2);
        assert!(outputs.contains(&Output::CheckpointDue));
    }
    // And the simulation is sensitive: another seed's schedule changes the result.
    let mut cfg = config(1);
    cfg.plan = ShardPlan::new(200, SHARDS, 16, 8).unwrap();
    let mut sm = machine_with(cfg);
    let mut now = Instant::now();
    let mut workers = vec![sm.register("solo".into(), now)];
    run(&mut sm, &mut workers, &mut now, |_, _, _, _| {});
    assert_ne!(bits(sm.params()), reference);
}

/// `--checkpoint-seconds`: a checkpoint is asked for after the first step that ends the interval
/// after the last one (the first step's start at first), and an epoch's end, which checkpoints
/// anyway, starts the interval again.
#[test]
fn checkpoints_by_the_clock_follow_the_interval_and_epoch_ends_restart_it() {
    let cfg = StateConfig {
        checkpoint_every: 0,
        checkpoint_interval: Some(Duration::from_secs(10)),
        ..config(1)
    };
    let steps_per_epoch = cfg.plan.steps_per_epoch() as u64;
    assert_eq!(steps_per_epoch, 13);
    let mut sm = machine_with(cfg);
    let mut now = Instant::now();
    let w = sm.register("solo".into(), now);
    let (mut due, mut epoch_ends) = (Vec::new(), Vec::new());
    // Bounded: a machine that stopped handing out tasks fails the test instead of hanging it.
    for _ in 0..1_000 {
        match sm.phase() {
            Phase::Finished => break,
            // Every evaluation takes 6 s.
            Phase::Evaluating => {
                now += Duration::from_secs(6);
                sm.finish_evaluation(now);
            }
            _ => {}
        }
        let TaskDecision::Task(task) = sm.next_task(w, now) else {
            continue;
        };
        // Every step takes 4 s.
        now += Duration::from_secs(4);
        let results = compute(&task, sm.params());
        submit(&mut sm, w, task.global_step, results, 4.0, now);
        for output in sm.drain_outputs() {
            match output {
                Output::CheckpointDue => due.push(sm.position().global_step),
                Output::EpochEnded { .. } => epoch_ends.push(sm.position().global_step),
                _ => {}
            }
        }
    }
    assert_eq!(*sm.phase(), Phase::Finished);
    assert_eq!(epoch_ends, vec![13, 26]);
    // 12 s after the start, then every third step. The first epoch's evaluation ends at 58 s and
    // restarts the clock, so the next is at 70 s (step 16), not 62 s (step 14, the clock left at
    // the epoch's end) or 60 s (step 15 without the evaluation, the clock never restarted).
    assert_eq!(due, vec![3, 6, 9, 12, 16, 19, 22, 25]);
}

#[test]
fn every_example_is_used_once_per_epoch() {
    let (mut sm, workers, now) = start(3);
    let mut seen = vec![0u32; 200];
    let steps = config(1).plan.steps_per_epoch();
    for _ in 0..steps {
        for &w in &workers {
            if let TaskDecision::Task(task) = sm.next_task(w, now) {
                for node in &task.nodes {
                    for s in &node.shards {
                        for &e in &s.examples {
                            seen[e as usize] += 1;
                        }
                    }
                }
                let results = compute(&task, sm.params());
                assert_eq!(
                    submit(&mut sm, w, task.global_step, results, 0.0, now),
                    SubmitOutcome::Accepted
                );
            }
        }
    }
    assert_eq!(*sm.phase(), Phase::Evaluating);
    assert!(seen.iter().all(|&c| c == 1));
}

#[test]
fn each_task_hints_the_examples_its_shards_take_next_step() {
    let (mut sm, workers, now) = start(3);
    let steps = config(1).plan.steps_per_epoch();
    let mut hints: HashMap<WorkerId, Vec<ShardWork>> = HashMap::new();
    let (mut hinted, mut unhinted) = (0, 0);
    for _ in 0..2 * steps {
        if *sm.phase() == Phase::Evaluating {
            sm.finish_evaluation(now);
        }
        let step_in_epoch = sm.position().step_in_epoch as usize;
        for &w in &workers {
            let TaskDecision::Task(task) = sm.next_task(w, now) else {
                panic!("every worker has a node each step");
            };
            let taken: Vec<ShardWork> = task.nodes.iter().flat_map(|n| n.shards.clone()).collect();
            // The hint given with the previous task, if any, is exactly what this step takes.
            if let Some(hint) = hints.remove(&w) {
                assert_eq!(hint, taken, "worker {w}, step {}", task.global_step);
                hinted += 1;
            }
            if step_in_epoch + 1 == steps {
                assert!(
                    task.next_examples.is_empty(),
                    "no hint across an epoch's end"
                );
                unhinted += 1;
            } else {
                hints.insert(w, task.next_examples.clone());
            }
            let results = compute(&task, sm.params());
            submit(&mut sm, w, task.global_step, results, 0.0, now);
        }
    }
    assert_eq!(hinted, 3 * (2 * steps - 2));
    assert_eq!(unhinted, 3 * 2);
}

#[test]
fn a_worker_lost_mid_step_changes_nothing() {
    let reference = reference_params();
    let (mut sm, mut workers, mut now) = start(3);
    let mut lost = None;
    run(&mut sm, &mut workers, &mut now, |sm, workers, now, step| {
        if step == 7 && lost.is_none() {
            // Worker 1 takes its task and goes silent; the others keep heartbeating.
            let victim = workers.remove(1);
            let TaskDecision::Task(task) = sm.next_task(victim, *now) else {
                panic!()
            };
            lost = Some((victim, task));
            *now += Duration::from_secs(2);
            for &w in workers.iter() {
                assert_eq!(sm.heartbeat(w, *now), HeartbeatAnswer::Known);
            }
            *now += Duration::from_secs(2);
            sm.tick(*now);
            let outputs = sm.drain_outputs();
            assert!(
                outputs.iter().any(|o| matches!(o, Output::WorkerLost { worker, moved, .. } if *worker == victim && !moved.is_empty())),
                "{outputs:?}"
            );
        }
    });
    assert_eq!(bits(sm.params()), reference);
    // Its late result is ignored, and it is told to register again.
    let (victim, task) = lost.unwrap();
    let results = compute(&task, &[0.5; PARAMS]);
    assert!(matches!(
        submit(&mut sm, victim, task.global_step, results, 0.0, now),
        SubmitOutcome::Ignored(_)
    ));
    assert_eq!(sm.next_task(victim, now), TaskDecision::UnknownWorker);
}

#[test]
fn late_and_duplicate_results_are_ignored() {
    let (mut sm, workers, now) = start(2);
    let TaskDecision::Task(task) = sm.next_task(workers[0], now) else {
        panic!()
    };
    let results = compute(&task, sm.params());
    assert_eq!(
        submit(
            &mut sm,
            workers[0],
            task.global_step,
            results.clone(),
            0.0,
            now
        ),
        SubmitOutcome::Accepted
    );
    assert!(matches!(
        submit(
            &mut sm,
            workers[0],
            task.global_step,
            results.clone(),
            0.0,
            now
        ),
        SubmitOutcome::Ignored(_)
    ));
    // Someone else's nodes.
    assert!(matches!(
        submit(
            &mut sm,
            workers[1],
            task.global_step,
            results.clone(),
            0.0,
            now
        ),
        SubmitOutcome::Ignored(_)
    ));
    // A step that is not in progress.
    assert!(matches!(
        submit(&mut sm, workers[0], task.global_step + 1, results, 0.0, now),
        SubmitOutcome::Ignored(_)
    ));
    assert_eq!(sm.position().global_step, 0);
}

#[test]
fn poisoned_gradients_are_rejected_and_recomputed_elsewhere() {
    let reference = reference_params();
    let (mut sm, mut workers, mut now) = start(2);
    let mut rejected = Vec::new();
    let outputs = run(&mut sm, &mut workers, &mut now, |sm, workers, now, step| {
        if (step == 3 || step == 9) && rejected.len() < 2 {
            let w = workers[0];
            let TaskDecision::Task(task) = sm.next_task(w, *now) else {
                return;
            };
            let mut results = compute(&task, sm.params());
            if step == 3 {
                results[0].1.grad[2] = f32::NAN;
            } else {
                results[0].1.grad.pop();
            }
            let outcome = submit(sm, w, task.global_step, results, 0.0, *now);
            assert!(matches!(outcome, SubmitOutcome::Rejected(_)), "{outcome:?}");
            assert_eq!(
                sm.position().global_step,
                step,
                "the step waits for a good result"
            );
            rejected.push(step);
        }
    });
    assert_eq!(rejected, [3, 9]);
    let rejections = outputs
        .iter()
        .filter(|o| matches!(o, Output::ResultRejected { .. }))
        .count();
    assert_eq!(rejections, 2);
    assert_eq!(bits(sm.params()), reference);
}

#[test]
fn wrong_example_counts_are_rejected() {
    let (mut sm, workers, now) = start(1);
    let TaskDecision::Task(task) = sm.next_task(workers[0], now) else {
        panic!()
    };
    let mut results = compute(&task, sm.params());
    results[0].1.stats.examples += 1;
    assert!(matches!(
        submit(&mut sm, workers[0], 0, results, 0.0, now),
        SubmitOutcome::Rejected(_)
    ));
}

#[test]
fn a_diverging_run_stops_instead_of_looping() {
    let (mut sm, workers, now) = start(2);
    let mut outputs = Vec::new();
    for _ in 0..6 {
        for &w in &workers {
            if let TaskDecision::Task(task) = sm.next_task(w, now) {
                let mut results = compute(&task, sm.params());
                for r in &mut results {
                    r.1.grad[0] = f32::INFINITY;
                }
                submit(&mut sm, w, task.global_step, results, 0.0, now);
            }
        }
        // Rejected by both workers, the node is computed here: diverged for real, so the
        // coordinator's own result is not finite either.
        for output in sm.drain_outputs() {
            if let Output::ComputeNode {
                global_step,
                epoch,
                work,
            } = &output
            {
                let task = Task {
                    global_step: *global_step,
                    epoch: *epoch,
                    nodes: vec![work.clone()],
                    next_examples: Vec::new(),
                };
                let (node, mut sum) = compute(&task, sm.params()).remove(0);
                sum.grad[0] = f32::INFINITY;
                sm.accept_own_computation(*global_step, node, sum);
            }
            outputs.push(output);
        }
    }
    assert!(
        matches!(sm.phase(), Phase::Failed(reason) if reason.contains("diverged")),
        "{:?}",
        sm.phase()
    );
    assert_eq!(sm.next_task(workers[0], now), TaskDecision::Done);
    assert!(
        !outputs
            .iter()
            .any(|o| matches!(o, Output::WorkerQuarantined { .. })),
        "honest workers of a diverging run are not blamed"
    );
}

#[test]
fn with_no_workers_left_it_waits_then_stops_and_a_newcomer_resumes_the_step() {
    let reference = reference_params();
    // A newcomer within the bound picks up the stranded work.
    let (mut sm, mut workers, mut now) = start(1);
    let mut replaced = false;
    run(&mut sm, &mut workers, &mut now, |sm, workers, now, step| {
        if step == 4 && !replaced {
            replaced = true;
            let old = workers.pop().unwrap();
            let _ = sm.next_task(old, *now);
            *now += Duration::from_secs(4);
            sm.tick(*now);
            assert_eq!(sm.live_workers(), 0);
            *now += Duration::from_secs(5);
            sm.tick(*now);
            assert_eq!(
                *sm.phase(),
                Phase::Training,
                "still within --no-worker-timeout"
            );
            workers.push(sm.register("replacement".into(), *now));
        }
    });
    assert_eq!(bits(sm.params()), reference);

    // Nobody comes: the run stops with a message.
    let (mut sm, workers, mut now) = start(1);
    let _ = sm.next_task(workers[0], now);
    now += Duration::from_secs(4);
    sm.tick(now);
    now += Duration::from_secs(11);
    sm.tick(now);
    assert!(matches!(sm.phase(), Phase::Failed(reason) if reason.contains("no worker")));
}

#[test]
fn training_waits_for_the_requested_workers() {
    let mut sm = machine(3);
    let now = Instant::now();
    let a = sm.register("a".into(), now);
    let _b = sm.register("b".into(), now);
    assert_eq!(sm.next_task(a, now), TaskDecision::Wait);
    let _c = sm.register("c".into(), now);
    assert!(matches!(sm.next_task(a, now), TaskDecision::Task(_)));
}

#[test]
fn a_worker_that_heartbeats_but_never_finishes_does_not_stall_the_run() {
    let reference = reference_params();
    let (mut sm, workers, mut now) = start(2);
    let (good, stuck) = (workers[0], workers[1]);
    let mut backed_up = 0;
    let mut removed = false;
    for _ in 0..10_000 {
        match sm.phase() {
            Phase::Finished | Phase::Failed(_) => break,
            Phase::Evaluating => sm.finish_evaluation(now),
            _ => {}
        }
        // The stuck worker takes whatever it is given and never answers, but stays alive.
        let _ = sm.next_task(stuck, now);
        if let TaskDecision::Task(task) = sm.next_task(good, now) {
            let results = compute(&task, sm.params());
            submit(&mut sm, good, task.global_step, results, 0.01, now);
        }
        now += Duration::from_millis(400);
        if !removed {
            sm.heartbeat(stuck, now);
        }
        sm.heartbeat(good, now);
        sm.tick(now);
        for output in sm.drain_outputs() {
            match output {
                Output::NodeBackedUp { slow, backup, .. } => {
                    assert_eq!((slow, backup), (stuck, good));
                    backed_up += 1;
                }
                Output::WorkerLost { worker, reason, .. } => {
                    assert_eq!(worker, stuck);
                    assert!(reason.contains("held its work"), "{reason}");
                    removed = true;
                }
                _ => {}
            }
        }
    }
    assert_eq!(
        *sm.phase(),
        Phase::Finished,
        "the run went on without the stuck worker"
    );
    assert!(
        removed,
        "the stuck worker is removed after being overtaken repeatedly"
    );
    assert!(backed_up >= 3, "{backed_up} backups");
    assert_eq!(bits(sm.params()), reference, "backups change no bit");
}

#[test]
fn a_lone_worker_that_heartbeats_but_never_finishes_is_backed_up_by_the_coordinator() {
    let reference = reference_params();
    let (mut sm, workers, mut now) = start(1);
    let stuck = workers[0];
    let mut outputs = Vec::new();
    let mut lost = false;
    for _ in 0..10_000 {
        match sm.phase() {
            Phase::Finished | Phase::Failed(_) => break,
            Phase::Evaluating => sm.finish_evaluation(now),
            _ => {}
        }
        if sm.live_workers() == 0 {
            // As a real worker does when its heartbeat is refused: register again.
            let again = sm.register("stuck".into(), now);
            lost |= again != stuck;
        }
        for w in sm_workers(&outputs, stuck) {
            let _ = sm.next_task(w, now);
            sm.heartbeat(w, now);
        }
        now += Duration::from_millis(400);
        for w in sm_workers(&outputs, stuck) {
            sm.heartbeat(w, now);
        }
        sm.tick(now);
        serve_compute_requests(&mut sm, &mut outputs, now);
    }
    assert_eq!(*sm.phase(), Phase::Finished, "the run did not stall");
    assert!(lost, "the stuck worker was dropped for holding its work");
    assert!(
        outputs
            .iter()
            .any(|o| matches!(o, Output::ComputeNode { .. })),
        "the coordinator computed the stuck worker's nodes"
    );
    assert_eq!(
        bits(sm.params()),
        reference,
        "the coordinator's copy changes no bit"
    );
}

#[test]
fn a_lone_straggler_that_still_delivers_first_is_not_dropped() {
    let reference = reference_params();
    let (mut sm, workers, mut now) = start(1);
    let slow = workers[0];
    let mut backups_asked = 0;
    for _ in 0..10_000 {
        match sm.phase() {
            Phase::Finished | Phase::Failed(_) => break,
            Phase::Evaluating => sm.finish_evaluation(now),
            _ => {}
        }
        let TaskDecision::Task(task) = sm.next_task(slow, now) else {
            now += Duration::from_millis(10);
            sm.tick(now);
            continue;
        };
        // Every other step takes long enough (2 s after a 10 ms step) to be backed up by the
        // coordinator, whose computation is never served here: the worker's own result,
        // arriving first, must be used, and the worker is not "overtaken".
        let slow_step = task.global_step % 2 == 1;
        now += if slow_step {
            Duration::from_secs(2)
        } else {
            Duration::from_millis(10)
        };
        sm.heartbeat(slow, now);
        sm.tick(now);
        backups_asked += sm
            .drain_outputs()
            .iter()
            .filter(|o| matches!(o, Output::ComputeNode { .. }))
            .count();
        let results = compute(&task, sm.params());
        submit(&mut sm, slow, task.global_step, results, 0.01, now);
    }
    assert_eq!(*sm.phase(), Phase::Finished);
    assert!(
        backups_asked >= 3,
        "{backups_asked} coordinator backups asked"
    );
    assert_eq!(sm.live_workers(), 1, "the worker was never dropped");
    assert_eq!(bits(sm.params()), reference);
}

/// Every worker id that has joined so far (`first` and the re-registrations in `outputs`).
fn sm_workers(outputs: &[Output], first: WorkerId) -> Vec<WorkerId> {
    let mut ids = vec![first];
    ids.extend(outputs.iter().filter_map(|o| match o {
        Output::WorkerJoined { worker, .. } => Some(*worker),
        _ => None,
    }));
    ids
}

#[test]
fn a_slow_original_and_its_backup_give_one_result() {
    let reference = reference_params();
    let (mut sm, workers, mut now) = start(2);
    let (a, b) = (workers[0], workers[1]);
    // Step 0: both finish quickly, so the straggler limit becomes the minimum.
    for w in [a, b] {
        let TaskDecision::Task(task) = sm.next_task(w, now) else {
            panic!()
        };
        let results = compute(&task, sm.params());
        now += Duration::from_millis(10);
        submit(&mut sm, w, task.global_step, results, 0.01, now);
    }
    // Step 1: b is slow; a finishes, then gets b's node as a backup and finishes it too.
    let TaskDecision::Task(slow_task) = sm.next_task(b, now) else {
        panic!()
    };
    let TaskDecision::Task(task) = sm.next_task(a, now) else {
        panic!()
    };
    let results = compute(&task, sm.params());
    submit(&mut sm, a, task.global_step, results, 0.01, now);
    now += Duration::from_secs(2);
    sm.heartbeat(a, now);
    sm.heartbeat(b, now);
    sm.tick(now);
    assert!(
        sm.drain_outputs()
            .iter()
            .any(|o| matches!(o, Output::NodeBackedUp { slow, .. } if *slow == b))
    );
    let TaskDecision::Task(backup) = sm.next_task(a, now) else {
        panic!("the backup goes to the other worker")
    };
    assert_eq!(backup.nodes, slow_task.nodes);
    let slow_results = compute(&slow_task, sm.params());
    let results = compute(&backup, sm.params());
    assert_eq!(
        submit(&mut sm, a, backup.global_step, results, 0.01, now),
        SubmitOutcome::Accepted
    );
    assert_eq!(sm.position().global_step, 2, "the backup completed step 1");
    // The original's late answer is for a finished step: ignored.
    assert!(matches!(
        submit(&mut sm, b, slow_task.global_step, slow_results, 0.01, now),
        SubmitOutcome::Ignored(_)
    ));
    // Both carry on and the result is the reference's.
    let mut workers = vec![a, b];
    run(&mut sm, &mut workers, &mut now, |_, _, _, _| {});
    assert_eq!(bits(sm.params()), reference);
}

fn verified_machine(min_workers: usize) -> StateMachine {
    let cfg = StateConfig {
        verify_fraction: 1.0,
        verify_secret: 42,
        ..config(min_workers)
    };
    machine_with(cfg)
}

/// Computes what the machine asks the coordinator to compute itself, as the driver does.
fn serve_compute_requests(sm: &mut StateMachine, outputs: &mut Vec<Output>, now: Instant) {
    loop {
        let drained = sm.drain_outputs();
        if drained.is_empty() {
            return;
        }
        for output in &drained {
            if let Output::ComputeNode {
                global_step,
                epoch,
                work,
            } = output
            {
                let task = Task {
                    global_step: *global_step,
                    epoch: *epoch,
                    nodes: vec![work.clone()],
                    next_examples: Vec::new(),
                };
                let (node, sum) = compute(&task, sm.params()).remove(0);
                sm.accept_own_computation(*global_step, node, sum);
                sm.apply_ready_update(now);
            }
        }
        outputs.extend(drained);
    }
}

/// Runs to the end, each worker's results made by `results(worker, task, parameters)`, and the
/// coordinator's own computations served as the driver serves them.
fn run_serving(
    sm: &mut StateMachine,
    workers: &[WorkerId],
    now: Instant,
    mut results: impl FnMut(WorkerId, &Task, &[f32]) -> Vec<NodeResult>,
) -> Vec<Output> {
    let mut outputs = Vec::new();
    for _ in 0..10_000 {
        match sm.phase() {
            Phase::Finished | Phase::Failed(_) => break,
            Phase::Evaluating => sm.finish_evaluation(now),
            _ => {}
        }
        for &w in workers {
            if let TaskDecision::Task(task) = sm.next_task(w, now) {
                let results = results(w, &task, sm.params());
                sm.submit(w, task.global_step, results, 0.01, now);
                sm.apply_ready_update(now);
            }
            serve_compute_requests(sm, &mut outputs, now);
        }
    }
    outputs.extend(sm.drain_outputs());
    outputs
}

/// Runs to the end under verification; `tamper` may change a worker's results before they go.
fn run_verified(
    sm: &mut StateMachine,
    workers: &[WorkerId],
    now: Instant,
    mut tamper: impl FnMut(WorkerId, u64, &mut Vec<(Node, GradientSum)>),
) -> Vec<Output> {
    run_serving(sm, workers, now, |w, task, params| {
        let mut results = compute(task, params);
        tamper(w, task.global_step, &mut results);
        results
            .into_iter()
            .map(|(node, sum)| NodeResult::new(node, sum))
            .collect()
    })
}

#[test]
fn verification_quarantines_a_worker_one_ulp_off_and_keeps_the_honest_bits() {
    let reference = reference_params();
    let mut sm = verified_machine(2);
    let now = Instant::now();
    let workers = vec![
        sm.register("honest (10.0.0.1:1)".into(), now),
        sm.register("flaky (10.0.0.2:1)".into(), now),
    ];
    let outputs = run_verified(&mut sm, &workers, now, |w, step, results| {
        if w == workers[1] && step == 4 {
            let g = &mut results[0].1.grad[3];
            *g = f32::from_bits(g.to_bits() ^ 1);
        }
    });
    assert_eq!(*sm.phase(), Phase::Finished);
    assert_eq!(bits(sm.params()), reference);
    let quarantined: Vec<&Output> = outputs
        .iter()
        .filter(|o| matches!(o, Output::WorkerQuarantined { .. }))
        .collect();
    assert!(
        matches!(quarantined[..], [Output::WorkerQuarantined { worker, reason, .. }]
            if *worker == workers[1] && reason.contains("step 4")),
        "{quarantined:?}"
    );
    assert!(
        sm.quarantine_reason("flaky").is_some(),
        "its name is refused"
    );
    assert!(sm.quarantine_reason("honest").is_none());
    let verified = outputs
        .iter()
        .filter(|o| matches!(o, Output::NodeVerified { agreed: true, .. }))
        .count();
    // Steps 0-3 with two workers: both nodes of each step agreed; after the quarantine the
    // coordinator verifies the lone worker itself.
    assert!(
        verified >= 8,
        "nodes were verified by a second worker: {verified}"
    );
}

#[test]
fn a_lone_worker_is_verified_by_the_coordinator_itself() {
    let reference = reference_params();
    let mut sm = verified_machine(1);
    let now = Instant::now();
    let workers = vec![sm.register("solo".into(), now)];
    let outputs = run_verified(&mut sm, &workers, now, |_, _, _| {});
    assert_eq!(*sm.phase(), Phase::Finished);
    assert_eq!(bits(sm.params()), reference);
    assert!(
        outputs
            .iter()
            .any(|o| matches!(o, Output::ComputeNode { .. }))
    );
}

#[test]
fn a_worker_whose_rejected_results_others_compute_correctly_is_quarantined_not_the_run_failed() {
    let reference = reference_params();
    let (mut sm, mut workers, mut now) = start(2);
    let hostile = workers[0];
    let outputs = run(&mut sm, &mut workers, &mut now, |sm, workers, now, _| {
        if !workers.contains(&hostile) {
            return;
        }
        let TaskDecision::Task(task) = sm.next_task(hostile, *now) else {
            return;
        };
        let mut results = compute(&task, sm.params());
        // Finite, but far beyond any honest gradient.
        results[0].1.grad.iter_mut().for_each(|g| *g = 1e22);
        let outcome = submit(sm, hostile, task.global_step, results, 0.0, *now);
        assert!(matches!(outcome, SubmitOutcome::Rejected(ref r) if r.contains("honest")));
        if sm.quarantine_reason("w0").is_some() {
            workers.retain(|w| *w != hostile);
        }
    });
    assert_eq!(*sm.phase(), Phase::Finished);
    assert_eq!(bits(sm.params()), reference);
    assert!(sm.params().iter().all(|p| p.is_finite()));
    assert!(
        outputs
            .iter()
            .any(|o| matches!(o, Output::WorkerQuarantined { worker, .. } if *worker == hostile))
    );
}

mod interleavings {
    //! Any interleaving of registrations, losses, waits, late, duplicate, withheld and poisoned
    //! results ends with the single-worker parameters, bit for bit, and finite. One worker (the
    //! first) is hostile: it may poison; the others are honest but unreliable.

    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone, Copy)]
    enum Answer {
        Honest,
        Duplicate,
        /// Kept and delivered later (a late result).
        Late,
        /// Taken and never answered (heartbeats go on).
        Never,
        /// Hostile worker only: NaN, a short vector, a huge finite value, or one ulp off
        /// (the last only under verification, which is what catches it).
        Nan,
        Short,
        Huge,
        Ulp,
    }

    #[derive(Debug, Clone, Copy)]
    enum Event {
        Join,
        Lose(usize),
        Turn(usize, Answer),
        DeliverLate,
        Wait(u8),
    }

    fn event() -> impl Strategy<Value = Event> {
        let answer = prop_oneof![
            4 => Just(Answer::Honest),
            1 => Just(Answer::Duplicate),
            1 => Just(Answer::Late),
            1 => Just(Answer::Never),
            1 => Just(Answer::Nan),
            1 => Just(Answer::Short),
            1 => Just(Answer::Huge),
            1 => Just(Answer::Ulp),
        ];
        prop_oneof![
            1 => Just(Event::Join),
            1 => (0..8usize).prop_map(Event::Lose),
            8 => (0..8usize, answer).prop_map(|(w, a)| Event::Turn(w, a)),
            1 => Just(Event::DeliverLate),
            1 => (1..40u8).prop_map(Event::Wait),
        ]
    }

    /// A worker's results for a step, kept to be delivered late.
    type Withheld = (WorkerId, u64, Vec<(Node, GradientSum)>);

    struct World {
        sm: StateMachine,
        now: Instant,
        /// Registered (possibly since removed) workers; index 0 is the hostile one.
        workers: Vec<WorkerId>,
        late: Vec<Withheld>,
        outputs: Vec<Output>,
        verify: bool,
    }

    impl World {
        fn new(verify: bool) -> World {
            let cfg = StateConfig {
                verify_fraction: if verify { 1.0 } else { 0.0 },
                verify_secret: 3,
                ..config(1)
            };
            let mut sm = machine_with(cfg);
            let now = Instant::now();
            let hostile = sm.register("hostile".into(), now);
            World {
                sm,
                now,
                workers: vec![hostile],
                late: Vec::new(),
                outputs: Vec::new(),
                verify,
            }
        }

        fn settle(&mut self) {
            if *self.sm.phase() == Phase::Evaluating {
                self.sm.finish_evaluation(self.now);
            }
            serve_compute_requests(&mut self.sm, &mut self.outputs, self.now);
        }

        fn apply(&mut self, event: Event) {
            match event {
                Event::Join => {
                    let name = format!("w{}", self.workers.len());
                    self.workers.push(self.sm.register(name, self.now));
                }
                Event::Lose(i) => {
                    let w = self.workers[i % self.workers.len()];
                    self.sm.remove_worker(w, "lost (test)".into());
                }
                Event::Turn(i, answer) => {
                    let i = i % self.workers.len();
                    let w = self.workers[i];
                    let answer = match answer {
                        Answer::Nan | Answer::Short | Answer::Huge if i != 0 => Answer::Honest,
                        Answer::Ulp if i != 0 || !self.verify => Answer::Honest,
                        a => a,
                    };
                    let TaskDecision::Task(task) = self.sm.next_task(w, self.now) else {
                        return;
                    };
                    let mut results = compute(&task, self.sm.params());
                    let step = task.global_step;
                    match answer {
                        Answer::Never => return,
                        Answer::Late => {
                            self.late.push((w, step, results));
                            return;
                        }
                        Answer::Nan => results[0].1.grad[1] = f32::NAN,
                        Answer::Short => {
                            results[0].1.grad.pop();
                        }
                        Answer::Huge => results[0].1.grad[0] = 1e22,
                        Answer::Ulp => {
                            let g = &mut results[0].1.grad[2];
                            *g = f32::from_bits(g.to_bits() ^ 1);
                        }
                        Answer::Honest | Answer::Duplicate => {}
                    }
                    if matches!(answer, Answer::Duplicate) {
                        submit(&mut self.sm, w, step, results.clone(), 0.01, self.now);
                    }
                    submit(&mut self.sm, w, step, results, 0.01, self.now);
                }
                Event::DeliverLate => {
                    for (w, step, results) in std::mem::take(&mut self.late) {
                        submit(&mut self.sm, w, step, results, 0.01, self.now);
                    }
                }
                Event::Wait(seconds) => {
                    // Live workers heartbeat while time passes but compute nothing, so the
                    // coordinator backs their work up and may drop them for stalling. With
                    // nobody left the run would rightly stop (--no-worker-timeout), so a
                    // newcomer arrives whenever the last one goes.
                    for s in 0..seconds {
                        if self.sm.live_workers() == 0 {
                            self.apply(Event::Join);
                        }
                        self.now += Duration::from_secs(1);
                        for &w in &self.workers {
                            self.sm.heartbeat(w, self.now);
                        }
                        self.sm.tick(self.now);
                        if s % 8 == 0 {
                            self.settle();
                        }
                    }
                }
            }
            self.settle();
        }

        /// An honest newcomer and the honest survivors finish the run; time passes so that work
        /// withheld by anyone gets a backup.
        fn finish(&mut self) {
            let closer = self.sm.register("closer".into(), self.now);
            self.workers.push(closer);
            for _ in 0..5_000 {
                match self.sm.phase() {
                    Phase::Finished | Phase::Failed(_) => return,
                    _ => {}
                }
                let honest: Vec<WorkerId> = self.workers[1..].to_vec();
                for w in honest {
                    if let TaskDecision::Task(task) = self.sm.next_task(w, self.now) {
                        let results = compute(&task, self.sm.params());
                        submit(&mut self.sm, w, task.global_step, results, 0.01, self.now);
                    }
                    self.settle();
                }
                self.now += Duration::from_millis(500);
                for &w in &self.workers {
                    self.sm.heartbeat(w, self.now);
                }
                self.sm.tick(self.now);
                self.settle();
            }
        }
    }

    proptest! {
        // A random seed each run: 40,000 cases passed here (about 50 s each 20,000); a failure
        // prints its minimal interleaving.
        #![proptest_config(ProptestConfig {
            cases: 512,
            failure_persistence: None,
            ..ProptestConfig::default()
        })]

        #[test]
        fn any_interleaving_ends_with_the_single_worker_parameters(
            verify in any::<bool>(),
            events in proptest::collection::vec(event(), 0..80),
        ) {
            let reference = reference_params();
            let mut world = World::new(verify);
            for event in events {
                world.apply(event);
            }
            world.finish();
            prop_assert_eq!(world.sm.phase(), &Phase::Finished, "{:?}", world.sm.phase());
            prop_assert!(world.sm.params().iter().all(|p| p.is_finite()));
            prop_assert_eq!(bits(world.sm.params()), reference);
        }
    }
}

/// A machine with `workers` registered whose first step's results are all in, and its update
/// taken: one worker returns the tree's root (a single sum), three return several nodes.
fn ready_update(
    workers: usize,
    optimizer: OptimizerConfig,
    clip_norm: Option<f64>,
) -> coordinator::state::UpdateJob {
    let cfg = StateConfig {
        optimizer,
        clip_norm,
        ..config(workers)
    };
    let mut sm = machine_with(cfg);
    let now = Instant::now();
    let ids: Vec<_> = (0..workers)
        .map(|i| sm.register(format!("w{i}"), now))
        .collect();
    for w in ids {
        let TaskDecision::Task(task) = sm.next_task(w, now) else {
            panic!("worker {w} gets no task");
        };
        let results = compute(&task, sm.params())
            .into_iter()
            .map(|(node, sum)| NodeResult::new(node, sum))
            .collect();
        assert_eq!(
            sm.submit(w, task.global_step, results, 0.01, now),
            SubmitOutcome::Accepted
        );
    }
    sm.take_update().expect("every node is in")
}

/// The first step by its definition, whole-vector pass by pass: the mean of one node's sum over
/// every shard, clipped in place when asked, then the optimizer's step.
fn first_step_by_definition(optimizer: &OptimizerConfig, clip_norm: Option<f64>) -> Vec<f32> {
    let mut sm = machine_with(config(1));
    let now = Instant::now();
    let w = sm.register("w".into(), now);
    let TaskDecision::Task(task) = sm.next_task(w, now) else {
        panic!("no task");
    };
    let mut params = sm.params().to_vec();
    let [(_, sum)] = <[_; 1]>::try_from(compute(&task, &params)).expect("one node");
    let n = sum.stats.examples as f32;
    let mut grad: Vec<f32> = sum.grad.iter().map(|g| g / n).collect();
    if let Some(max) = clip_norm {
        let norm = clip_grad_norm(&mut grad, max);
        assert!(
            norm > max,
            "the test's gradient must be clipped (norm {norm})"
        );
    }
    let mut state = optimizer.init_state(params.len());
    optimizer.step(&mut params, &grad, &mut state).unwrap();
    params
}

/// The parameters an update writes into a mirror (the workers' parameter file) are the ones it
/// hands back, bit for bit, and the same as without a mirror, on every path: one node or a tree,
/// with and without clipping, Adam and SGD; and they are the step's definition, computed pass by
/// pass. A mirror of the wrong length fails the update and changes nothing.
#[test]
fn an_update_writes_the_same_parameters_into_its_mirror_on_every_path() {
    for optimizer in [OptimizerConfig::adam(0.01), OptimizerConfig::sgd(0.05, 0.9)] {
        // 0.25 clips the test gradient (norm 0.4), so the coefficient is applied.
        for clip_norm in [None, Some(0.25)] {
            // One node's single sum, which the tree's must equal.
            let one_node = ready_update(1, optimizer.clone(), clip_norm).run(None);
            assert_eq!(
                bits(&one_node.params),
                bits(&first_step_by_definition(&optimizer, clip_norm)),
                "{}, clip {clip_norm:?}: the definition",
                optimizer.name()
            );
            for workers in [1, 3] {
                let case = format!(
                    "{workers} workers, {}, clip {clip_norm:?}",
                    optimizer.name()
                );
                let plain = ready_update(workers, optimizer.clone(), clip_norm).run(None);
                plain.outcome.as_ref().expect(&case);
                assert_ne!(bits(&plain.params), bits(&[0.5; PARAMS]), "{case}: no step");
                assert_eq!(bits(&plain.params), bits(&one_node.params), "{case}: tree");

                let mut mirror = vec![f32::NAN; PARAMS];
                let mirrored =
                    ready_update(workers, optimizer.clone(), clip_norm).run(Some(&mut mirror));
                mirrored.outcome.as_ref().expect(&case);
                assert_eq!(
                    bits(&mirrored.params),
                    bits(&plain.params),
                    "{case}: params"
                );
                assert_eq!(bits(&mirror), bits(&plain.params), "{case}: mirror");
                assert_eq!(
                    mirrored.opt_state, plain.opt_state,
                    "{case}: optimizer state"
                );

                let mut short = vec![f32::NAN; PARAMS - 1];
                let refused =
                    ready_update(workers, optimizer.clone(), clip_norm).run(Some(&mut short));
                let e = refused.outcome.expect_err(&case);
                assert!(e.contains("mirror"), "{case}: {e}");
                assert_eq!(bits(&refused.params), bits(&[0.5; PARAMS]), "{case}");
                assert!(short.iter().all(|v| v.is_nan()), "{case}: mirror written");
            }
        }
    }
}

/// Hands `worker`'s task of the current step in without applying the update (a mailbox thread
/// takes it next, or the driver).
fn submit_only(sm: &mut StateMachine, worker: WorkerId, now: Instant) {
    let TaskDecision::Task(task) = sm.next_task(worker, now) else {
        panic!("a task for the only worker");
    };
    let results = compute(&task, sm.params())
        .into_iter()
        .map(|(node, sum)| NodeResult::new(node, sum))
        .collect();
    assert_eq!(
        sm.submit(worker, task.global_step, results, 0.01, now),
        SubmitOutcome::Accepted
    );
}

/// Runs a taken update and hands it back, checking that the machine knew it was out.
fn run_taken(sm: &mut StateMachine, job: coordinator::state::UpdateJob, now: Instant) {
    assert!(sm.update_in_flight(), "the parameters are in the job");
    assert!(sm.take_update().is_none(), "an update is handed out once");
    sm.finish_update(job.run(None), 0.0, now);
    assert!(!sm.update_in_flight());
}

#[test]
fn updates_are_held_for_the_driver_while_it_needs_the_parameters() {
    let reference = reference_params();
    let (mut sm, workers, now) = start(1);
    let w = workers[0];
    let (mut taken_here, mut held) = (0, Vec::new());
    // The driver has not yet copied what it was told of (a checkpoint due, an epoch's end).
    let mut snapshot_due = false;
    loop {
        match sm.phase() {
            Phase::Finished => break,
            Phase::Evaluating => {
                sm.finish_evaluation(now);
                continue;
            }
            _ => {}
        }
        let step = sm.position().global_step;
        assert!(sm.params_of_step(step).is_some(), "step {step} in progress");
        submit_only(&mut sm, w, now);
        assert!(sm.params_of_step(step).is_none(), "step {step} complete");
        match sm.take_update_unless_held() {
            Some(job) => {
                assert!(
                    !snapshot_due,
                    "step {step}: taken before the driver's snapshot"
                );
                taken_here += 1;
                run_taken(&mut sm, job, now);
            }
            None => {
                assert!(snapshot_due, "step {step}: held with nothing due");
                held.push(step);
                // The driver copies the parameters (all there), then takes the update itself.
                assert_eq!(sm.params().len(), PARAMS);
                sm.snapshot_taken();
                snapshot_due = false;
                assert!(sm.take_update_of(step + 1).is_none(), "only the step named");
                let job = sm
                    .take_update_of(step)
                    .expect("the driver takes a held update");
                run_taken(&mut sm, job, now);
            }
        }
        for output in sm.drain_outputs() {
            if matches!(output, Output::CheckpointDue | Output::EpochEnded { .. }) {
                snapshot_due = true;
            }
        }
    }
    // Checkpoints every 5 steps and two epochs of 13 steps: held once after each.
    assert_eq!(held, vec![5, 10, 13, 15, 20, 25], "{taken_here} taken here");
    assert_eq!(
        bits(sm.params()),
        reference,
        "the same bits whoever runs the updates"
    );

    // A stop holds updates for good: the driver's snapshot no longer releases them.
    let (mut sm, workers, now) = start(1);
    submit_only(&mut sm, workers[0], now);
    sm.hold_updates_for_stop();
    sm.snapshot_taken();
    assert!(
        sm.take_update_unless_held().is_none(),
        "stopping: no thread takes it"
    );
    assert!(!sm.update_in_flight());
    let job = sm.take_update().expect("the driver still can");
    run_taken(&mut sm, job, now);
}

/// Gradient values left "in a worker's shared memory": read only through measured copies. From
/// copy `rewrite.0 + 1` on, value 0 reads as `rewrite.1` (the worker rewrote it after it was
/// accepted).
#[derive(Debug)]
struct InWorkerMemory {
    values: Vec<f32>,
    rewrite: Option<(usize, f32)>,
    copies: AtomicUsize,
}

impl SharedValues for InWorkerMemory {
    fn len(&self) -> usize {
        self.values.len()
    }

    fn copy_measuring(&self, start: usize, out: &mut [f32]) -> Magnitude {
        let copies = self.copies.fetch_add(1, Ordering::SeqCst) + 1;
        let magnitude = Magnitude::copy_measuring(out, &self.values[start..start + out.len()]);
        match self.rewrite {
            Some((after, bad)) if copies > after && start == 0 && !out.is_empty() => {
                out[0] = bad;
                Magnitude::of(out)
            }
            _ => magnitude,
        }
    }
}

/// Runs to the end with every result left in its worker's memory (`rewrite(worker, step)` says
/// whether and how that worker rewrites it), serving the coordinator's own computations.
fn run_shared(
    sm: &mut StateMachine,
    workers: &[WorkerId],
    now: Instant,
    rewrite: impl Fn(WorkerId, u64) -> Option<(usize, f32)>,
) -> Vec<Output> {
    run_serving(sm, workers, now, |w, task, params| {
        compute(task, params)
            .into_iter()
            .map(|(node, sum)| {
                let values = InWorkerMemory {
                    values: sum.grad,
                    rewrite: rewrite(w, task.global_step),
                    copies: AtomicUsize::new(0),
                };
                NodeResult::shared(node, Arc::new(values), sum.stats)
            })
            .collect()
    })
}

/// Results read where their workers wrote them (a co-located worker's shared memory) give the
/// same bits as copied ones, with and without verification (whose copies are copied out).
#[test]
fn results_read_where_workers_wrote_them_give_the_same_bits() {
    let reference = reference_params();
    for verify in [false, true] {
        let mut sm = if verify {
            verified_machine(3)
        } else {
            machine(3)
        };
        let now = Instant::now();
        let workers: Vec<WorkerId> = (0..3).map(|i| sm.register(format!("w{i}"), now)).collect();
        let outputs = run_shared(&mut sm, &workers, now, |_, _| None);
        assert_eq!(*sm.phase(), Phase::Finished, "verify {verify}");
        assert_eq!(bits(sm.params()), reference, "verify {verify}");
        assert!(
            !outputs
                .iter()
                .any(|o| matches!(o, Output::WorkerQuarantined { .. })),
            "verify {verify}"
        );
    }
}

/// A worker that rewrites its accepted gradient in shared memory while the update reads it: the
/// values that fail the update's second check are used as zeros (never as they are: the
/// parameters stay finite), the worker is quarantined, and the run goes on without it. A value
/// rewritten before the result is checked is rejected there, as any other.
#[test]
fn a_worker_that_rewrites_its_accepted_gradient_is_quarantined() {
    let reference = reference_params();
    for bad in [f32::NAN, 1e30] {
        let mut sm = machine(2);
        let now = Instant::now();
        let workers = vec![
            sm.register("honest (10.0.0.1:1)".into(), now),
            sm.register("rewriter (10.0.0.2:1)".into(), now),
        ];
        // Rewritten after the first copy (the check on arrival), at step 3.
        let outputs = run_shared(&mut sm, &workers, now, |w, step| {
            (w == workers[1] && step == 3).then_some((1, bad))
        });
        assert_eq!(*sm.phase(), Phase::Finished, "{bad}");
        assert!(sm.params().iter().all(|p| p.is_finite()), "{bad}");
        assert_ne!(bits(sm.params()), reference, "{bad}: that step used zeros");
        let quarantined: Vec<&Output> = outputs
            .iter()
            .filter(|o| matches!(o, Output::WorkerQuarantined { .. }))
            .collect();
        assert!(
            matches!(quarantined[..], [Output::WorkerQuarantined { worker, reason, .. }]
                if *worker == workers[1] && reason.contains("step 3")
                    && reason.contains("shared memory")),
            "{bad}: {quarantined:?}"
        );
        assert!(sm.quarantine_reason("rewriter").is_some());
    }

    // Rewritten before the check on arrival: rejected and recomputed, the bits unchanged.
    let mut sm = machine(2);
    let now = Instant::now();
    let workers = vec![
        sm.register("honest".into(), now),
        sm.register("early".into(), now),
    ];
    let outputs = run_shared(&mut sm, &workers, now, |w, step| {
        (w == workers[1] && step == 3).then_some((0, f32::NAN))
    });
    assert_eq!(*sm.phase(), Phase::Finished);
    assert_eq!(bits(sm.params()), reference);
    assert!(
        outputs
            .iter()
            .any(|o| matches!(o, Output::ResultRejected { step: 3, .. }))
    );
}

/// A worker whose accepted gradient the update finds rewritten is quarantined by name whether its
/// registration is gone by then (lost to a timeout, say) or still live, and its process's newer
/// registration under that name (a worker registers again after a failed call, before the old
/// one times out) is removed with it; the run goes on to its end with the honest worker.
#[test]
fn a_rewriter_is_quarantined_by_name_with_every_registration_under_it() {
    for old_removed_first in [true, false] {
        let mut sm = machine(2);
        let now = Instant::now();
        let workers = vec![
            sm.register("honest (10.0.0.1:1)".into(), now),
            sm.register("rewriter (10.0.0.2:1)".into(), now),
        ];
        for &w in &workers {
            let TaskDecision::Task(task) = sm.next_task(w, now) else {
                panic!("no task for {w}");
            };
            let results = compute(&task, sm.params())
                .into_iter()
                .map(|(node, sum)| {
                    let values = InWorkerMemory {
                        values: sum.grad,
                        // Rewritten after the check on arrival.
                        rewrite: (w == workers[1]).then_some((1, f32::NAN)),
                        copies: AtomicUsize::new(0),
                    };
                    NodeResult::shared(node, Arc::new(values), sum.stats)
                })
                .collect();
            sm.submit(w, task.global_step, results, 0.01, now);
        }
        if old_removed_first {
            sm.remove_worker(workers[1], "no heartbeat (test)".into());
        }
        // The same process registers again before the update ends.
        let again = sm.register("rewriter (10.0.0.2:2)".into(), now);
        let job = sm.take_update().expect("the step's results are all in");
        sm.finish_update(job.run(None), 0.0, now);
        let outputs = sm.drain_outputs();
        let quarantined: Vec<&Output> = outputs
            .iter()
            .filter(|o| matches!(o, Output::WorkerQuarantined { .. }))
            .collect();
        assert!(
            matches!(quarantined[..], [Output::WorkerQuarantined { worker, name, reason }]
                if *worker == workers[1] && name.starts_with("rewriter")
                    && reason.contains("shared memory")),
            "{old_removed_first}: {outputs:?}"
        );
        assert!(sm.quarantine_reason("rewriter").is_some());
        let lost = |id: WorkerId| {
            outputs
                .iter()
                .filter(|o| matches!(o, Output::WorkerLost { worker, .. } if *worker == id))
                .count()
        };
        assert_eq!(lost(again), 1, "{old_removed_first}: {outputs:?}");
        assert_eq!(
            lost(workers[1]),
            1,
            "{old_removed_first}: removed exactly once"
        );
        assert!(sm.params().iter().all(|p| p.is_finite()));
        assert_eq!(
            sm.live_workers(),
            1,
            "{old_removed_first}: the honest worker stays"
        );
        run_shared(&mut sm, &workers[..1], now, |_, _| None);
        assert_eq!(*sm.phase(), Phase::Finished, "{old_removed_first}");
    }
}

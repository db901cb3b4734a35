//! The coordinator's state machine, driven directly: no network, no clock. Workers are simulated
//! by a deterministic function of the examples, summed along the reduction tree as a real worker
//! does, so every scenario can be compared bit for bit with an undisturbed single-worker run.

use std::time::{Duration, Instant};

use common::optim::OptimizerConfig;
use common::train::{GradientSum, Node, ReductionTree, ShardPlan};
use coordinator::state::{
    EpochTotals, HeartbeatAnswer, Output, Phase, Position, StateConfig, StateMachine,
    SubmitOutcome, Task, TaskDecision, WorkerId,
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
        param_len: PARAMS,
    }
}

fn machine(min_workers: usize) -> StateMachine {
    let cfg = config(min_workers);
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
    let st = cfg.optimizer.init_state(PARAMS);
    let mut sm = StateMachine::new(
        cfg,
        vec![0.5; PARAMS],
        st,
        Position::default(),
        EpochTotals::default(),
        1,
    );
    let mut now = Instant::now();
    let mut workers = vec![sm.register("solo".into(), now)];
    run(&mut sm, &mut workers, &mut now, |_, _, _, _| {});
    assert_ne!(bits(sm.params()), reference);
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
    }
    assert!(
        matches!(sm.phase(), Phase::Failed(reason) if reason.contains("diverged")),
        "{:?}",
        sm.phase()
    );
    assert_eq!(sm.next_task(workers[0], now), TaskDecision::Done);
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

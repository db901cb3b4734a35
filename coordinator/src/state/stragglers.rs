//! Stragglers: a node held far longer than the previous step's slowest gets a backup copy on
//! another worker (or on the coordinator), and a worker whose nodes keep being finished by
//! backups is removed. Whichever copy arrives first is used; both are the same bits.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::train::Node;

use super::{Output, Phase, StateMachine, WorkerId};

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

impl StateMachine {
    /// Gives every node held longer than the straggler limit a backup copy on another worker.
    pub(super) fn back_up_stragglers(&mut self, now: Instant) {
        if self.phase != Phase::Training {
            return;
        }
        let limit = if self.last_slowest_node.is_zero() {
            STRAGGLER_FIRST
        } else {
            STRAGGLER_MIN.max(self.last_slowest_node.mul_f64(STRAGGLER_FACTOR))
        };
        let Some(step) = &self.step else { return };
        // Per node, who holds it and for how long: nodes handed out count from their hand-out
        // (or from being queued as a backup), nodes never asked for from the step's start (a
        // worker that heartbeats but stopped asking for work).
        let mut holders: BTreeMap<Node, Vec<(WorkerId, Duration)>> = BTreeMap::new();
        for (&w, nodes) in step.in_flight.iter().chain(&step.queued) {
            for &n in nodes {
                let since = step.handed_out.get(&(w, n)).unwrap_or(&step.started);
                holders
                    .entry(n)
                    .or_default()
                    .push((w, now.saturating_duration_since(*since)));
            }
        }
        // A node is late when everyone holding it has held it past the limit: a backup that
        // stalls too gets a backup of its own.
        let late: Vec<(Node, Vec<(WorkerId, Duration)>)> = holders
            .into_iter()
            .filter(|(n, held)| {
                !step.received.contains_key(n) && held.iter().all(|(_, d)| *d > limit)
            })
            .collect();
        for (node, held) in late {
            let (slow, held_for) = held[0];
            let mut avoid: BTreeSet<WorkerId> = held.iter().map(|(w, _)| *w).collect();
            let step = self.step.as_ref().expect("checked above");
            if step.own_backups.contains(&node) {
                continue;
            }
            avoid.extend(step.rejections.get(&node).into_iter().flatten());
            if let Some(copies) = step.verifying.get(&node) {
                if copies.coordinator_asked {
                    continue;
                }
                // A verified node's backup must be a new source.
                avoid.extend(copies.workers());
            }
            let Some(backup) = self.pick_worker_avoiding(&avoid) else {
                // No other worker: the coordinator computes it.
                self.step
                    .as_mut()
                    .expect("checked above")
                    .backups
                    .entry(node)
                    .or_insert(slow);
                self.back_up_here(node);
                continue;
            };
            let step = self.step.as_mut().expect("checked above");
            step.queued.entry(backup).or_default().push(node);
            step.handed_out.insert((backup, node), now);
            step.backups.entry(node).or_insert(slow);
            self.outputs.push(Output::NodeBackedUp {
                slow,
                name: self
                    .workers
                    .get(&slow)
                    .map_or_else(String::new, |w| w.name.clone()),
                node,
                held_seconds: held_for.as_secs_f64(),
                backup,
            });
        }
    }

    /// A backed-up node's result arrived: from a backup (`overtaken`) or from the slow worker.
    pub(super) fn note_overtaken(&mut self, slow: WorkerId, overtaken: bool) {
        if !overtaken {
            self.overtaken.remove(&slow);
            return;
        }
        if let Some(step) = &mut self.step {
            step.overtaken_now.insert(slow);
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
}

//! Progress reporting: a bar on a terminal, plain log lines otherwise.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

use crate::outputs::EpochMetrics;
use crate::state::Position;

/// Without a terminal, a progress line at most this often.
const LOG_EVERY: Duration = Duration::from_secs(5);

#[derive(Debug)]
pub struct Progress {
    bar: Option<ProgressBar>,
    steps_per_epoch: u64,
    epochs: u64,
    started: Instant,
    first_step: Option<u64>,
    last_log: Instant,
}

impl Progress {
    pub fn new(steps_per_epoch: u64, epochs: u64) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(steps_per_epoch * epochs);
            bar.set_style(
                ProgressStyle::with_template(
                    "{bar:30} {pos}/{len} steps {msg} [{elapsed_precise}, ETA {eta}]",
                )
                .expect("valid template"),
            );
            bar
        });
        Progress {
            bar,
            steps_per_epoch,
            epochs,
            started: Instant::now(),
            first_step: None,
            last_log: Instant::now(),
        }
    }

    pub fn step(&mut self, position: Position, elbo: f64, batch: u64) {
        let first = *self.first_step.get_or_insert(position.global_step - 1);
        let done = position.global_step - first;
        let elapsed = self.started.elapsed().as_secs_f64().max(1e-9);
        let rate = done as f64 * batch as f64 / elapsed;
        let msg = format!(
            "epoch {}/{} step {}/{} ELBO {elbo:.2} {rate:.0} ex/s",
            (position.epoch + 1).min(self.epochs),
            self.epochs,
            position.step_in_epoch,
            self.steps_per_epoch
        );
        match &self.bar {
            Some(bar) => {
                bar.set_position(position.global_step);
                bar.set_message(msg);
            }
            None if self.last_log.elapsed() >= LOG_EVERY => {
                self.last_log = Instant::now();
                let total = self.steps_per_epoch * self.epochs;
                let left = total.saturating_sub(position.global_step);
                let eta = left as f64 * elapsed / done.max(1) as f64;
                tracing::info!("{msg}, ETA {eta:.0}s");
            }
            None => {}
        }
    }

    pub fn epoch(&mut self, m: &EpochMetrics, eval_seconds: f64) {
        let line = format!(
            "epoch {}/{}: train ELBO {:.3}, held-out ELBO {:.3}{} (recon {:.3}, KL {:.3}), \
             {:.0} samples/s, compute {:.1}s / communication {:.1}s / update {:.1}s, eval {:.1}s",
            m.epoch,
            self.epochs,
            m.train_elbo,
            m.heldout_elbo,
            m.heldout_iw_bound
                .map_or(String::new(), |b| format!(", IW bound {b:.3}")),
            m.heldout_recon,
            m.heldout_kl,
            m.samples_per_s,
            m.time.compute_s,
            m.time.communicate_s,
            m.time.update_s,
            eval_seconds
        );
        match &self.bar {
            Some(bar) => bar.suspend(|| tracing::info!("{line}")),
            None => tracing::info!("{line}"),
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

//! A progress bar over the run's steps (indicatif), with the current loss and LR, and one line per
//! epoch and per evaluation: train loss and accuracy, eval loss and accuracy.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use recipe_engine::callback::{Callback, CallbackConfig};
use recipe_engine::error::Result;
use recipe_engine::plugin::{BindContext, TimeParams};
use recipe_engine::{Event, State};
use serde::{Deserialize, Serialize};
use std::time::Instant;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProgressBarConfig {}

impl TimeParams for ProgressBarConfig {}

struct Progress {
    bar: Option<ProgressBar>,
    start: Instant,
    bpe: u64,
}

impl CallbackConfig for ProgressBarConfig {
    fn build(&self, ctx: &BindContext) -> Result<Box<dyn Callback>> {
        Ok(Box::new(Progress {
            bar: None,
            start: Instant::now(),
            bpe: ctx.clock.batches_per_epoch,
        }))
    }
}

impl Progress {
    fn say(&self, line: String) {
        match &self.bar {
            Some(b) if !b.is_hidden() => b.println(line),
            _ => eprintln!("{line}"),
        }
    }
}

impl Callback for Progress {
    fn run_event(&mut self, event: Event, state: &mut State) -> Result<()> {
        // One progress bar for a data-parallel job: rank 0's (the numbers are the same).
        if !state.writes_files() {
            return Ok(());
        }
        match event {
            Event::FitStart => {
                self.start = Instant::now();
                let bar = ProgressBar::with_draw_target(
                    Some(state.max_batches()),
                    ProgressDrawTarget::stderr(),
                );
                bar.set_style(
                    ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} steps ({eta} left) {msg}")
                        .unwrap_or_else(|_| ProgressStyle::default_bar()),
                );
                if state.timestamp.batch > 0 {
                    bar.set_position(state.timestamp.batch);
                    bar.reset_eta();
                }
                self.bar = Some(bar);
                self.say(format!(
                    "training {}: {} steps ({} per epoch, batch {}), {} parameters",
                    state.run_name,
                    state.max_batches(),
                    self.bpe,
                    state.clock.samples_per_batch,
                    state.model.params().num_trainable()
                ));
            }
            Event::BatchEnd => {
                if let Some(b) = &self.bar {
                    b.set_position(state.timestamp.batch);
                    if let Some(l) = state.last_loss {
                        b.set_message(format!("loss {l:.4} lr {:.4}", state.lr));
                    }
                }
            }
            Event::EpochEnd => {
                let m = state.epoch_metrics;
                let eval = match state.last_eval {
                    Some(e) if e.at_batch == state.timestamp.batch => {
                        format!(" | eval loss {:.4} acc {:.2}%", e.loss, 100.0 * e.accuracy)
                    }
                    _ => String::new(),
                };
                self.say(format!(
                    "epoch {:>3}: train loss {:.4} acc {:.2}%{eval} [{:.1}s]",
                    state.timestamp.epoch + 1,
                    m.mean_loss(),
                    100.0 * m.accuracy(),
                    self.start.elapsed().as_secs_f64()
                ));
            }
            Event::EvalEnd => {
                // Evaluations that do not fall on an epoch end get their own line.
                let at_epoch_end = self.bpe > 0 && state.timestamp.batch_in_epoch == self.bpe;
                if let (Some(e), false) = (state.last_eval, at_epoch_end) {
                    self.say(format!(
                        "step {:>6}: eval loss {:.4} acc {:.2}% [{:.1}s]",
                        state.timestamp.batch,
                        e.loss,
                        100.0 * e.accuracy,
                        self.start.elapsed().as_secs_f64()
                    ));
                }
            }
            Event::FitEnd => {
                if let Some(b) = self.bar.take() {
                    b.finish_and_clear();
                }
            }
            _ => {}
        }
        Ok(())
    }
}

recipe_engine::register_callback!(
    ProgressBarConfig,
    "progress_bar",
    "Progress bar with loss and LR, and a line per epoch with train and eval metrics.",
    "{}"
);

//! Event dispatch. For one event:
//! 1. every algorithm's `matches` is evaluated before any `apply`;
//! 2. algorithms run in recipe order, reversed on after/end events (paired changes undo
//!    first-in-last-out);
//! 3. algorithms, then callbacks, then loggers; at INIT loggers first;
//! 4. what ran is traced at debug level.

use crate::algorithm::Algorithm;
use crate::callback::Callback;
use crate::error::{Error, Result};
use crate::event::Event;
use crate::state::State;

/// A named plugin instance (its place and name in the recipe).
pub struct Named<T: ?Sized> {
    pub label: String,
    pub inner: Box<T>,
}

#[derive(Default)]
pub struct Engine {
    pub algorithms: Vec<Named<dyn Algorithm>>,
    pub callbacks: Vec<Named<dyn Callback>>,
    /// When set, the wall time each algorithm spends in `apply`, by label, over the run: what
    /// `recipe bench throughput --trainer` reports as an algorithm's own cost per step.
    pub apply_time: Option<std::collections::BTreeMap<String, std::time::Duration>>,
}

impl Engine {
    pub fn run_event(&mut self, event: Event, state: &mut State) -> Result<()> {
        let order: Vec<usize> = if event.is_after_or_end() {
            (0..self.algorithms.len()).rev().collect()
        } else {
            (0..self.algorithms.len()).collect()
        };
        let matched: Vec<usize> = order
            .into_iter()
            .filter(|&i| self.algorithms[i].inner.matches(event, state))
            .collect();
        for i in matched {
            let a = &mut self.algorithms[i];
            tracing::debug!(event = event.name(), algorithm = a.label.as_str(), "apply");
            let t0 = self.apply_time.is_some().then(std::time::Instant::now);
            a.inner
                .apply(event, state)
                .map_err(|e| Error::msg(format!("{} failed at {event}: {e}", a.label)))?;
            if let (Some(t0), Some(times)) = (t0, self.apply_time.as_mut()) {
                *times.entry(a.label.clone()).or_default() += t0.elapsed();
            }
        }
        let loggers_first = event == Event::Init;
        // In a data-parallel job only rank 0 writes the logs (every rank logs the same reduced
        // values).
        let writes = state.writes_files();
        for pass in 0..2 {
            let want_loggers = (pass == 0) == loggers_first;
            for c in self
                .callbacks
                .iter_mut()
                .filter(|c| c.inner.is_logger() == want_loggers && (writes || !want_loggers))
            {
                tracing::debug!(event = event.name(), callback = c.label.as_str(), "run");
                c.inner
                    .run_event(event, state)
                    .map_err(|e| Error::msg(format!("{} failed at {event}: {e}", c.label)))?;
            }
        }
        state.pending_log.clear();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ModelConfig;
    use crate::plugin::BindContext;
    use candle_core::Device;
    use std::cell::RefCell;
    use std::rc::Rc;

    type Log = Rc<RefCell<Vec<String>>>;

    pub(crate) fn test_state() -> State {
        let ctx = BindContext::standalone(&Device::Cpu, [1, 2, 2], 2, 1);
        let model = crate::models::MlpConfig { hidden: vec![2] }
            .build(&ctx)
            .unwrap();
        let optimizer = crate::optim::OptimizerConfig::build(
            &crate::optim::SgdConfig {
                lr: 0.1,
                momentum: 0.0,
                dampening: 0.0,
                nesterov: false,
                weight_decay: 0.0,
                decoupled_weight_decay: false,
                decay_norm_and_bias: false,
            },
            &ctx,
            model.params(),
        )
        .unwrap();
        let mut s = State::new("t", 0, Device::Cpu, ctx.clock, model, optimizer, 1.0);
        s.run_dir = std::env::temp_dir();
        s
    }

    /// Matches when no algorithm has applied yet at this event (`state.log` marks applies), so a
    /// dispatcher that interleaved matches and applies would be caught.
    struct Probe {
        name: &'static str,
        log: Log,
    }

    impl Algorithm for Probe {
        fn matches(&self, event: Event, state: &State) -> bool {
            self.log
                .borrow_mut()
                .push(format!("match {} {event}", self.name));
            !state.pending_log.contains_key("applied")
        }
        fn apply(&mut self, event: Event, state: &mut State) -> Result<()> {
            self.log
                .borrow_mut()
                .push(format!("apply {} {event}", self.name));
            state.log("applied", 1.0);
            Ok(())
        }
    }

    struct Cb {
        name: &'static str,
        logger: bool,
        log: Log,
    }

    impl Callback for Cb {
        fn run_event(&mut self, event: Event, _state: &mut State) -> Result<()> {
            self.log
                .borrow_mut()
                .push(format!("callback {} {event}", self.name));
            Ok(())
        }
        fn is_logger(&self) -> bool {
            self.logger
        }
    }

    fn engine(log: &Log) -> Engine {
        let mut e = Engine::default();
        for name in ["a", "b"] {
            e.algorithms.push(Named {
                label: name.into(),
                inner: Box::new(Probe {
                    name,
                    log: log.clone(),
                }),
            });
        }
        e.callbacks.push(Named {
            label: "logger".into(),
            inner: Box::new(Cb {
                name: "logger",
                logger: true,
                log: log.clone(),
            }),
        });
        e.callbacks.push(Named {
            label: "cb".into(),
            inner: Box::new(Cb {
                name: "cb",
                logger: false,
                log: log.clone(),
            }),
        });
        e
    }

    #[test]
    fn matches_all_run_before_any_apply_in_recipe_order_then_callbacks_then_loggers() {
        let log: Log = Default::default();
        let mut state = test_state();
        engine(&log)
            .run_event(Event::BeforeLoss, &mut state)
            .unwrap();
        assert_eq!(
            *log.borrow(),
            [
                "match a before_loss",
                "match b before_loss",
                "apply a before_loss",
                "apply b before_loss",
                "callback cb before_loss",
                "callback logger before_loss"
            ]
        );
        assert!(
            state.pending_log.is_empty(),
            "the log is cleared after the loggers ran"
        );
    }

    #[test]
    fn after_events_reverse_the_algorithms_and_init_runs_loggers_first() {
        let log: Log = Default::default();
        let mut state = test_state();
        let mut e = engine(&log);
        e.run_event(Event::AfterLoss, &mut state).unwrap();
        assert_eq!(
            log.borrow()[..4],
            [
                "match b after_loss",
                "match a after_loss",
                "apply b after_loss",
                "apply a after_loss"
            ]
        );
        log.borrow_mut().clear();
        e.run_event(Event::Init, &mut state).unwrap();
        assert_eq!(
            log.borrow()[4..],
            ["callback logger init", "callback cb init"]
        );
    }
}

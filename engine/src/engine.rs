//! Event dispatch. For one event:
//! 1. every algorithm's `matches` is evaluated before any `apply`;
//! 2. algorithms run in recipe order, reversed on after/end events (paired changes undo
//!    first-in-last-out);
//! 3. algorithms, then callbacks, then loggers; at INIT loggers first;
//! 4. what ran is traced at debug level.

use crate::error::{Error, Result};
use crate::event::Event;
use crate::plugin::{Algorithm, Callback};
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
            a.inner
                .apply(event, state)
                .map_err(|e| Error::msg(format!("{} failed at {event}: {e}", a.label)))?;
        }
        let loggers_first = event == Event::Init;
        for pass in 0..2 {
            let want_loggers = (pass == 0) == loggers_first;
            for c in self
                .callbacks
                .iter_mut()
                .filter(|c| c.inner.is_logger() == want_loggers)
            {
                tracing::trace!(event = event.name(), callback = c.label.as_str(), "run");
                c.inner
                    .run_event(event, state)
                    .map_err(|e| Error::msg(format!("{} failed at {event}: {e}", c.label)))?;
            }
        }
        state.pending_log.clear();
        Ok(())
    }
}

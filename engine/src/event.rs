//! Training events, in the order the trainer fires them.

use std::fmt;

macro_rules! events {
    ($($variant:ident => $name:literal),* $(,)?) => {
        /// A point in the training loop where algorithms and callbacks run.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Event { $($variant),* }

        impl Event {
            /// Every event, in firing order (training events, then evaluation events).
            pub const ALL: &'static [Event] = &[$(Event::$variant),*];

            /// The event's name as it appears in logs and traces (`before_loss`).
            pub fn name(self) -> &'static str {
                match self { $(Event::$variant => $name),* }
            }
        }
    };
}

events! {
    Init => "init",
    BeforeLoad => "before_load",
    AfterLoad => "after_load",
    FitStart => "fit_start",
    EpochStart => "epoch_start",
    BeforeDataloader => "before_dataloader",
    AfterDataloader => "after_dataloader",
    BatchStart => "batch_start",
    BeforeTrainBatch => "before_train_batch",
    BeforeForward => "before_forward",
    AfterForward => "after_forward",
    BeforeLoss => "before_loss",
    AfterLoss => "after_loss",
    BeforeBackward => "before_backward",
    AfterBackward => "after_backward",
    AfterTrainBatch => "after_train_batch",
    BatchEnd => "batch_end",
    BatchCheckpoint => "batch_checkpoint",
    EpochEnd => "epoch_end",
    EpochCheckpoint => "epoch_checkpoint",
    FitEnd => "fit_end",
    EvalStart => "eval_start",
    EvalBatchStart => "eval_batch_start",
    EvalBeforeForward => "eval_before_forward",
    EvalAfterForward => "eval_after_forward",
    EvalBatchEnd => "eval_batch_end",
    EvalEnd => "eval_end",
}

impl Event {
    /// After and end events run algorithms in reverse recipe order, so paired changes undo
    /// first-in-last-out.
    pub fn is_after_or_end(self) -> bool {
        let n = self.name();
        n.starts_with("after_") || n.contains("_after_") || n.ends_with("_end")
    }

    pub fn is_eval(self) -> bool {
        self.name().starts_with("eval_")
    }
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn after_and_end_events_are_the_reversed_ones() {
        let reversed: Vec<_> = Event::ALL
            .iter()
            .filter(|e| e.is_after_or_end())
            .map(|e| e.name())
            .collect();
        assert_eq!(
            reversed,
            [
                "after_load",
                "after_dataloader",
                "after_forward",
                "after_loss",
                "after_backward",
                "after_train_batch",
                "batch_end",
                "epoch_end",
                "fit_end",
                "eval_after_forward",
                "eval_batch_end",
                "eval_end"
            ]
        );
    }
}

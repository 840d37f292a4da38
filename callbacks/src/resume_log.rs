//! What loggers do when a run resumes into its old folder: keep every record logged up to the
//! checkpoint, drop what the interrupted run logged after it (the resumed run logs it again).

use recipe_engine::time::Timestamp;

/// Whether what is logged at `event` belongs to the step being trained: from EPOCH_START to
/// AFTER_TRAIN_BATCH the timestamp still counts the steps done before it, so a record at batch
/// `b` there belongs to step `b + 1`.
pub fn belongs_to_next_step(event: &str) -> bool {
    matches!(
        event,
        "epoch_start"
            | "before_dataloader"
            | "after_dataloader"
            | "batch_start"
            | "before_train_batch"
            | "before_forward"
            | "after_forward"
            | "before_loss"
            | "after_loss"
            | "before_backward"
            | "after_backward"
            | "after_train_batch"
    )
}

/// Whether a record logged at `batch` by `event` was logged before a checkpoint taken at `ts`.
/// A checkpoint at the last batch of an epoch (batch_in_epoch > 0) comes before that epoch's
/// EPOCH_END; one at EPOCH_CHECKPOINT (batch_in_epoch == 0) comes after it; FIT_END is always
/// logged again.
pub fn before_checkpoint(batch: u64, event: &str, ts: &Timestamp) -> bool {
    if batch != ts.batch || belongs_to_next_step(event) {
        return batch < ts.batch;
    }
    match event {
        "fit_end" => false,
        "epoch_end" | "epoch_checkpoint" => ts.batch_in_epoch == 0,
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_end_records_follow_the_checkpoint_they_came_after() {
        let mid = Timestamp {
            batch: 10,
            batch_in_epoch: 10,
            ..Default::default()
        };
        let boundary = Timestamp {
            batch: 10,
            epoch: 1,
            ..Default::default()
        };
        assert!(before_checkpoint(9, "fit_end", &mid));
        assert!(!before_checkpoint(11, "batch_end", &mid));
        assert!(before_checkpoint(10, "batch_end", &mid));
        assert!(!before_checkpoint(10, "after_dataloader", &mid));
        assert!(before_checkpoint(9, "after_dataloader", &mid));
        assert!(!before_checkpoint(10, "epoch_start", &boundary));
        assert!(!before_checkpoint(10, "epoch_end", &mid));
        assert!(before_checkpoint(10, "epoch_end", &boundary));
        assert!(!before_checkpoint(10, "fit_end", &boundary));
    }
}

//! Synchronised batch norm (`sync_batchnorm: true`, PyTorch's `SyncBatchNorm`): in training,
//! every batch norm normalises with the mean and variance of the whole global batch instead of
//! each rank's share, and its input gradient takes the global batch's sums; the running
//! statistics are then the same on every rank by construction. Data parallel with it trains as
//! one process would at the global batch, batch norm included.
//!
//! The fused CPU kernels do it themselves (`recipe_kernels::BatchNormStats::sync`): a batch norm
//! sums [count, Σx, Σx²] per channel across ranks once in its forward pass and (Σdy, Σdy·x) once
//! in its backward pass, through the job's all-reduce; everything else runs as without it. Every
//! rank runs the same passes in the same order (the shares are equal, see `check_world`), so the
//! collectives pair up.
//!
//! The conversion runs at bind time, after the algorithms' surgery, on one process as on many:
//! a recipe builds the same tree (`SyncBatchNorm2d` modules, the parameters under the same
//! names) at every world size, so its checkpoints move between world sizes (with `--force`). In
//! a job of one there is nothing to sum and the plain kernels run bit for bit.

use super::world;
use crate::error::{Error, Result};
use crate::model::{downcast, downcast_box, Network};
use crate::models::layers::BatchNorm2d;
use recipe_kernels::StatSum;
use std::sync::Arc;

/// The job's all-reduce as the kernels' statistics sum; `None` in a job of one.
fn stat_sum() -> Option<StatSum> {
    let w = world();
    if w.size() < 2 {
        return None;
    }
    Some(Arc::new(move |buf: &mut [f64]| {
        w.sum_f64(buf)
            .map_err(|e| candle_core::Error::Msg(format!("synchronised batch norm: {e}")))
    }))
}

/// Synchronises every plain batch norm of `net` across the job's processes (the recipe's
/// `sync_batchnorm: true`). Batch norms another algorithm rewrote (GhostBatchNorm's per-chunk
/// statistics) keep their own.
pub fn convert(net: &mut Network) -> Result<Vec<String>> {
    let sum = stat_sum();
    net.replace(
        "sync_batchnorm",
        |_, m| downcast::<BatchNorm2d>(m).is_some(),
        |_, m| {
            let mut bn = downcast_box::<BatchNorm2d>(m).map_err(|_| {
                Error::msg("sync_batchnorm selected a module that is not a BatchNorm2d")
            })?;
            bn.synchronise(sum.clone());
            Ok(bn)
        },
    )
}

//! Data-parallel training across processes: the collective operations the trainer needs, and the
//! process's place in the job.
//!
//! A job is `size` processes (ranks) that each hold the whole model. Every global batch is split
//! between them by position (rank r takes the r-th contiguous share, [`shard_range`]); each rank
//! runs the forward and backward passes on its share; the gradients are summed across ranks,
//! weighted by each rank's sample count, before AFTER_TRAIN_BATCH, so every rank steps with the
//! gradient of the global batch's mean loss and the weights stay identical on every rank. Loss,
//! accuracy and sample counts are reduced the same way, so every rank logs (and every callback
//! decides on) the same numbers; evaluation is sharded and reduced too.
//!
//! The communication is an existing engine's: MPI through the `mpi` crate (feature `mpi`),
//! started by `mpirun`/`srun`; without it the process is a job of one ([`Single`]). Which one a
//! process uses is set once, at start, by [`install`]; the trainer reads it with [`world`].

#[cfg(feature = "mpi")]
pub mod mpi;
pub mod sync_batchnorm;

use crate::error::{Error, Result};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// The collective operations of a job, called by every rank in the same order with buffers of
/// the same length.
pub trait Collective: Send + Sync {
    /// This process's rank, in 0..size.
    fn rank(&self) -> usize;
    /// The number of processes in the job.
    fn size(&self) -> usize;
    /// Elementwise sum across ranks, in place: every rank ends with the same values.
    fn sum_f32(&self, buf: &mut [f32]) -> Result<()>;
    /// Elementwise sum across ranks, in place (counts and loss sums: exact for integers below
    /// 2^53).
    fn sum_f64(&self, buf: &mut [f64]) -> Result<()>;
    /// Rank 0's `bytes` on every rank (what rank 0 decided: the run folder, the checkpoint to
    /// resume from).
    fn broadcast(&self, bytes: &mut Vec<u8>) -> Result<()>;
    /// Ends every rank of the job now, with `code` (after an error on this rank, so that the
    /// others do not wait for it in a collective forever).
    fn abort(&self, code: i32) -> !;
}

/// A job of one process: sums are the values themselves.
#[derive(Debug, Default, Clone, Copy)]
pub struct Single;

impl Collective for Single {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn sum_f32(&self, _buf: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn sum_f64(&self, _buf: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn broadcast(&self, _bytes: &mut Vec<u8>) -> Result<()> {
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}

static WORLD: OnceLock<Arc<dyn Collective>> = OnceLock::new();

/// How long a collective waits for the other ranks by default before the job is ended: 30
/// minutes, torch.distributed's default. Long enough for every legitimate wait of a healthy job
/// (rank 0 checking a large image folder or writing a checkpoint while the others wait at the
/// next collective); short enough that a hung rank does not hold a cluster allocation for hours.
pub const DEFAULT_COLLECTIVE_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// The timeout in milliseconds, 0 for none.
static COLLECTIVE_TIMEOUT_MS: AtomicU64 =
    AtomicU64::new(DEFAULT_COLLECTIVE_TIMEOUT.as_secs() * 1000);

/// Sets how long a collective may wait for the other ranks (`None`: for ever) before this rank
/// ends the job (`recipe run --collective-timeout`). Read by the MPI world's watchdog at every
/// collective.
pub fn set_collective_timeout(t: Option<Duration>) {
    let ms = t.map_or(0, |t| (t.as_millis() as u64).max(1));
    COLLECTIVE_TIMEOUT_MS.store(ms, Ordering::Relaxed);
}

/// The timeout in force (`None`: a collective waits for ever).
pub fn collective_timeout() -> Option<Duration> {
    match COLLECTIVE_TIMEOUT_MS.load(Ordering::Relaxed) {
        0 => None,
        ms => Some(Duration::from_millis(ms)),
    }
}

/// Sets the job this process belongs to, once, before any trainer is built.
pub fn install(world: Arc<dyn Collective>) -> Result<()> {
    WORLD
        .set(world)
        .map_err(|_| Error::msg("the process's job (MPI world) was already set"))
}

/// The job this process belongs to: the installed one, or a job of one.
pub fn world() -> Arc<dyn Collective> {
    WORLD
        .get()
        .cloned()
        .unwrap_or_else(|| Arc::new(Single) as Arc<dyn Collective>)
}

/// Whether an MPI launcher started this process (Open MPI's `mpirun`, MPICH's `mpiexec`/Hydra,
/// Slurm's `srun` through PMI or PMIx), read from the environment without starting MPI; with the
/// job's size when the launcher says it.
pub fn launched_by_mpi() -> Option<Option<usize>> {
    launched_by_mpi_from(env)
}

fn env(k: &str) -> Option<String> {
    std::env::var(k).ok()
}

fn launched_by_mpi_from(var: impl Fn(&str) -> Option<String>) -> Option<Option<usize>> {
    ["OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"]
        .iter()
        .find(|k| var(k).is_some())?;
    let size = ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE"]
        .iter()
        .find_map(|k| var(k)?.trim().parse::<usize>().ok());
    Some(size)
}

/// This process's rank among the job's processes on its own machine, as the launcher says
/// (Open MPI, MPICH/Hydra, Slurm); `None` outside a launcher.
pub fn local_rank() -> Option<usize> {
    local_rank_from(env)
}

fn local_rank_from(var: impl Fn(&str) -> Option<String>) -> Option<usize> {
    launched_by_mpi_from(&var)?;
    [
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "MPI_LOCALRANKID",
        "SLURM_LOCALID",
    ]
    .iter()
    .find_map(|k| var(k)?.trim().parse().ok())
}

/// Data parallel, after a step's backward pass: replaces each gradient by the sum over ranks of
/// `weight` times it, divided by `total` (with each rank's sample count as its weight and the
/// global count as the total: the gradient of the global batch's mean loss), and sets every
/// floating-point buffer (batch norm's running statistics) to its mean over the ranks; identical
/// on every rank. Batch norm normalises each rank's share by its own statistics (as PyTorch's
/// default), so without the averaging the ranks' running statistics would drift apart while their
/// weights stay equal; averaged every step, every rank holds the same state at every batch, and a
/// checkpoint taken at any batch is that state. Everything travels in one fused buffer, in
/// parameter order: every rank holds the same parameters, and the same ones have gradients
/// (freezing is decided by time, not by data).
pub fn reduce_step(
    world: &dyn Collective,
    params: &crate::param::ParamStore,
    grads: Option<&mut candle_core::backprop::GradStore>,
    weight: f64,
    total: f64,
) -> Result<()> {
    use crate::param::ParamKind;
    use candle_core::{DType, Tensor};
    let flat = |t: &Tensor, scale: f64| -> Result<Vec<f32>> {
        Ok((t.to_dtype(DType::F32)? * scale)?
            .flatten_all()?
            .to_vec1::<f32>()?)
    };
    let with_grad: Vec<Tensor> = match &grads {
        Some(g) => params
            .trainable()
            .map(|p| p.var.as_tensor())
            .filter(|t| g.get(t).is_some())
            .cloned()
            .collect(),
        None => Vec::new(),
    };
    let buffers: Vec<&crate::param::Param> = params
        .iter()
        .filter(|p| p.kind == ParamKind::Buffer && p.var.dtype().is_float())
        .collect();
    let mut buf: Vec<f32> = Vec::new();
    if let Some(g) = &grads {
        for t in &with_grad {
            let gi = g
                .get(t)
                .ok_or_else(|| Error::msg("a gradient went missing during the reduction"))?;
            buf.extend(flat(gi, weight)?);
        }
    }
    for p in &buffers {
        buf.extend(flat(p.var.as_tensor(), 1.0)?);
    }
    if buf.is_empty() {
        return Ok(());
    }
    world.sum_f32(&mut buf)?;
    let mut at = 0;
    let mut take = |t: &Tensor, inv: f32| -> Result<Tensor> {
        let len = t.elem_count();
        let v: Vec<f32> = buf[at..at + len].iter().map(|x| x * inv).collect();
        at += len;
        Ok(Tensor::from_vec(v, t.dims(), t.device())?.to_dtype(t.dtype())?)
    };
    if let Some(g) = grads {
        let inv = (1.0 / total) as f32;
        for t in &with_grad {
            let mean = take(t, inv)?;
            g.insert(t, mean);
        }
    }
    let inv = 1.0 / world.size() as f32;
    for p in buffers {
        let mean = take(p.var.as_tensor(), inv)?;
        p.var.set(&mean)?;
    }
    Ok(())
}

/// Rank 0's text on every rank.
pub fn agree(world: &dyn Collective, text: String) -> Result<String> {
    let mut bytes = text.into_bytes();
    world.broadcast(&mut bytes)?;
    String::from_utf8(bytes)
        .map_err(|e| Error::msg(format!("rank 0 sent text that is not UTF-8: {e}")))
}

/// The samples of a batch of `n` that rank `rank` of `size` takes: a contiguous share, in rank
/// order; shares differ by at most one sample when `n` does not divide.
pub fn shard_range(n: usize, rank: usize, size: usize) -> std::ops::Range<usize> {
    n * rank / size..n * (rank + 1) / size
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The launchers' variables, read as each documents them: a GPU per local rank depends on
    /// it (`device: cuda` in a job).
    #[test]
    fn local_rank_comes_from_the_launcher() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        const OPEN_MPI: &[(&str, &str)] = &[
            ("OMPI_COMM_WORLD_RANK", "5"),
            ("OMPI_COMM_WORLD_SIZE", "8"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
        ];
        assert_eq!(local_rank_from(vars(OPEN_MPI)), Some(1));
        assert_eq!(launched_by_mpi_from(vars(OPEN_MPI)), Some(Some(8)));
        const HYDRA: &[(&str, &str)] = &[
            ("PMI_RANK", "3"),
            ("PMI_SIZE", "4"),
            ("MPI_LOCALRANKID", "3"),
        ];
        assert_eq!(local_rank_from(vars(HYDRA)), Some(3));
        const SLURM: &[(&str, &str)] = &[("PMIX_RANK", "6"), ("SLURM_LOCALID", "2")];
        assert_eq!(local_rank_from(vars(SLURM)), Some(2));
        assert_eq!(launched_by_mpi_from(vars(SLURM)), Some(None));
        // A stray SLURM_LOCALID outside a launched job (an sbatch script's own shell) is no rank.
        assert_eq!(local_rank_from(vars(&[("SLURM_LOCALID", "1")])), None);
        assert_eq!(
            local_rank_from(vars(&[("OMPI_COMM_WORLD_RANK", "0")])),
            None
        );
    }

    #[test]
    fn shards_cover_a_batch_once_in_order() {
        for n in [0, 1, 5, 128, 129] {
            for size in 1..5 {
                let mut next = 0;
                for rank in 0..size {
                    let r = shard_range(n, rank, size);
                    assert_eq!(r.start, next, "n {n} size {size} rank {rank}");
                    assert!(r.len() >= n / size && r.len() <= n.div_ceil(size));
                    next = r.end;
                }
                assert_eq!(next, n);
            }
        }
    }
}

//! Cross entropy with hard (class index) or soft (distribution) targets.

use super::contiguous_slice;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, D};

/// What a batch's targets are: class indices (u32, [N]) or distributions (float, [N, K]).
#[derive(Debug, Clone)]
pub enum Targets {
    Hard(Tensor),
    Soft(Tensor),
}

/// Mean cross entropy of `logits` [N, K] against hard or soft targets. On CPU (f32/f64) one fused
/// op: log-softmax, the pick or the weighted sum, and the mean in one pass, and a backward that
/// writes `(softmax * Σt - t) / N` directly; elsewhere candle's ops.
pub fn cross_entropy(logits: &Tensor, targets: &Targets) -> Result<Tensor> {
    let fused = logits.device().is_cpu()
        && matches!(logits.dtype(), DType::F32 | DType::F64)
        && logits.rank() == 2;
    if fused {
        let z = logits.contiguous()?;
        return match targets {
            Targets::Hard(t) => z.apply_op2(
                &t.to_dtype(DType::U32)?.contiguous()?,
                SoftmaxCe { hard: true },
            ),
            Targets::Soft(t) => z.apply_op2(
                &t.to_dtype(z.dtype())?.contiguous()?,
                SoftmaxCe { hard: false },
            ),
        };
    }
    let logp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    match targets {
        Targets::Hard(t) => {
            let picked = logp.gather(&t.to_dtype(DType::U32)?.unsqueeze(1)?, 1)?;
            picked.mean_all()?.neg()
        }
        Targets::Soft(t) => {
            let n = logits.dim(0)? as f64;
            ((logp * t.to_dtype(logits.dtype())?)?.sum_all()? / n)?.neg()
        }
    }
}

/// Fused softmax cross entropy on (logits [N, K], targets: u32 [N] or float [N, K]).
struct SoftmaxCe {
    hard: bool,
}

/// The target weights of one row: a one-hot row for a class index (checked against K).
fn target_row<'a>(
    hard: &'a [u32],
    soft: &'a [f64],
    hard_mode: bool,
    i: usize,
    k: usize,
) -> Result<Box<dyn Fn(usize) -> f64 + 'a>> {
    if hard_mode {
        let t = hard[i] as usize;
        if t >= k {
            candle_core::bail!(
                "cross_entropy: label {t} of sample {i} is not below the {k} classes"
            );
        }
        Ok(Box::new(move |j| if j == t { 1.0 } else { 0.0 }))
    } else {
        Ok(Box::new(move |j| soft[i * k + j]))
    }
}

/// Row-wise log-sum-exp of logits [N, K] (as f64).
fn logsumexp(z: &[f64], k: usize) -> Vec<f64> {
    z.chunks_exact(k)
        .map(|r| {
            let m = r.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            m + r.iter().map(|v| (v - m).exp()).sum::<f64>().ln()
        })
        .collect()
}

/// Reads the op's inputs as f64: logits, hard labels (or empty), soft targets (or empty).
fn ce_inputs(
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
    hard: bool,
) -> Result<(Vec<f64>, Vec<u32>, Vec<f64>)> {
    fn floats(s: &CpuStorage, l: &Layout) -> Result<Vec<f64>> {
        Ok(match s {
            CpuStorage::F32(_) => contiguous_slice::<f32>(s, l, "cross_entropy")?
                .iter()
                .map(|&v| v as f64)
                .collect(),
            CpuStorage::F64(_) => contiguous_slice::<f64>(s, l, "cross_entropy")?.to_vec(),
            _ => candle_core::bail!("cross_entropy: logits must be f32 or f64"),
        })
    }
    let z = floats(s1, l1)?;
    Ok(if hard {
        (
            z,
            contiguous_slice::<u32>(s2, l2, "cross_entropy")?.to_vec(),
            Vec::new(),
        )
    } else {
        (z, Vec::new(), floats(s2, l2)?)
    })
}

fn check_targets(l1: &Layout, l2: &Layout, hard: bool) -> Result<(usize, usize)> {
    let (n, k) = l1.shape().dims2()?;
    let want: &[usize] = if hard { &[n] } else { &[n, k] };
    if l2.shape().dims() != want {
        candle_core::bail!(
            "cross_entropy: targets of shape {:?} for logits {:?} (expected {want:?})",
            l2.shape().dims(),
            l1.shape().dims()
        );
    }
    if n == 0 || k == 0 {
        candle_core::bail!("cross_entropy: empty logits {:?}", l1.shape().dims());
    }
    Ok((n, k))
}

/// Both cross-entropy ops' inputs, checked and read as f64, with each row's log-sum-exp.
struct CeInputs {
    n: usize,
    k: usize,
    z: Vec<f64>,
    hard: Vec<u32>,
    soft: Vec<f64>,
    lse: Vec<f64>,
}

impl CeInputs {
    fn read(
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        hard_targets: bool,
    ) -> Result<Self> {
        let (n, k) = check_targets(l1, l2, hard_targets)?;
        let (z, hard, soft) = ce_inputs(s1, l1, s2, l2, hard_targets)?;
        let lse = logsumexp(&z, k);
        Ok(CeInputs {
            n,
            k,
            z,
            hard,
            soft,
            lse,
        })
    }
}

fn storage_of(dtype: DType, v: Vec<f64>) -> Result<CpuStorage> {
    Ok(match dtype {
        DType::F32 => CpuStorage::F32(v.into_iter().map(|x| x as f32).collect()),
        DType::F64 => CpuStorage::F64(v),
        d => candle_core::bail!("cross_entropy: unsupported dtype {d:?}"),
    })
}

impl CustomOp2 for SoftmaxCe {
    fn name(&self) -> &'static str {
        "softmax_cross_entropy"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let CeInputs {
            n,
            k,
            z,
            hard,
            soft,
            lse,
        } = CeInputs::read(s1, l1, s2, l2, self.hard)?;
        let mut total = 0.0;
        for (i, l) in lse.iter().enumerate() {
            let t = target_row(&hard, &soft, self.hard, i, k)?;
            total += (0..k).map(|j| t(j) * (l - z[i * k + j])).sum::<f64>();
        }
        Ok((
            storage_of(s1.dtype(), vec![total / n as f64])?,
            Shape::from(()),
        ))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let scale = dy.to_dtype(DType::F64)?.to_scalar::<f64>()? / logits.dim(0)? as f64;
        let dz = logits.apply_op2_no_bwd(
            targets,
            &SoftmaxCeGrad {
                hard: self.hard,
                scale,
            },
        )?;
        let dt = if !self.hard && targets.track_op() {
            let logp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
            Some((logp * (-scale))?)
        } else {
            None
        };
        Ok((Some(dz), dt))
    }
}

/// d(loss)/d(logits) = scale * (softmax(z) Σt - t), from (logits, targets).
struct SoftmaxCeGrad {
    hard: bool,
    scale: f64,
}

impl CustomOp2 for SoftmaxCeGrad {
    fn name(&self) -> &'static str {
        "softmax_cross_entropy_grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let CeInputs {
            n,
            k,
            z,
            hard,
            soft,
            lse,
        } = CeInputs::read(s1, l1, s2, l2, self.hard)?;
        let mut dz = vec![0.0; n * k];
        for i in 0..n {
            let t = target_row(&hard, &soft, self.hard, i, k)?;
            let tsum: f64 = (0..k).map(&t).sum();
            for j in 0..k {
                let p = (z[i * k + j] - lse[i]).exp();
                dz[i * k + j] = self.scale * (p * tsum - t(j));
            }
        }
        Ok((storage_of(s1.dtype(), dz)?, l1.shape().clone()))
    }
}

/// How many rows of `logits` have their largest value at the target class.
pub fn top1_correct(logits: &Tensor, labels: &Tensor) -> Result<u64> {
    let pred = logits.argmax(D::Minus1)?;
    let eq = pred.eq(&labels.to_dtype(DType::U32)?)?;
    eq.to_dtype(DType::U32)?
        .sum_all()?
        .to_scalar::<u32>()
        .map(|v| v as u64)
}

/// How many rows of `logits` [N, K] have their label among the `k` largest logits (top-k
/// accuracy's numerator): a row counts when fewer than `k` logits exceed its label's. Ties with
/// the label's logit count for the label.
pub fn topk_correct(logits: &Tensor, labels: &Tensor, k: usize) -> Result<u64> {
    let labels = labels.to_dtype(DType::U32)?.unsqueeze(1)?;
    let own = logits.gather(&labels.contiguous()?, 1)?;
    let above = logits
        .broadcast_gt(&own)?
        .to_dtype(DType::U32)?
        .sum(D::Minus1)?;
    above
        .lt(k as u32)?
        .to_dtype(DType::U32)?
        .sum_all()?
        .to_scalar::<u32>()
        .map(|v| v as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn top_k_counts_labels_among_the_k_largest_logits() {
        let logits = Tensor::new(
            &[
                [0.1f32, 0.9, 0.5, 0.3],
                [0.8, 0.1, 0.2, 0.7],
                [0.4, 0.3, 0.2, 0.1],
            ],
            &Device::Cpu,
        )
        .unwrap();
        let labels = Tensor::new(&[2u32, 3, 3], &Device::Cpu).unwrap();
        // Ranks of the labels: 2nd, 2nd, 4th.
        assert_eq!(topk_correct(&logits, &labels, 1).unwrap(), 0);
        assert_eq!(topk_correct(&logits, &labels, 2).unwrap(), 2);
        assert_eq!(topk_correct(&logits, &labels, 4).unwrap(), 3);
        // Top-1 agrees with argmax.
        let labels = Tensor::new(&[1u32, 0, 0], &Device::Cpu).unwrap();
        assert_eq!(
            topk_correct(&logits, &labels, 1).unwrap(),
            top1_correct(&logits, &labels).unwrap()
        );
    }

    #[test]
    fn hard_and_one_hot_soft_targets_agree_and_match_a_hand_value() {
        let logits = Tensor::new(&[[1.0f32, 2.0, 0.5], [0.0, 0.0, 3.0]], &Device::Cpu).unwrap();
        let hard = Targets::Hard(Tensor::new(&[1u32, 2], &Device::Cpu).unwrap());
        let soft = Targets::Soft(
            Tensor::new(&[[0.0f32, 1.0, 0.0], [0.0, 0.0, 1.0]], &Device::Cpu).unwrap(),
        );
        let a = cross_entropy(&logits, &hard)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let b = cross_entropy(&logits, &soft)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        // by hand: -ln(e^2/(e+e^2+e^.5)) = 0.464366, -ln(e^3/(2+e^3)) = 0.094924
        assert!((a - (0.464366 + 0.094924) / 2.0).abs() < 1e-5, "{a}");
        assert!((a - b).abs() < 1e-6);
        let labels = Tensor::new(&[1u32, 0], &Device::Cpu).unwrap();
        assert_eq!(top1_correct(&logits, &labels).unwrap(), 1);
    }

    /// The fused op against candle's log-softmax path, loss and logits gradient, hard and soft
    /// targets, f32 against f32 and f64 against finite differences; a label out of range is an
    /// error, not a panic.
    #[test]
    fn fused_matches_candle_and_finite_differences() {
        use crate::testing::{check_grad_fd, max_rel_err, rand_tensor};
        use candle_core::Var;
        let (n, k) = (7, 5);
        let z = Var::from_tensor(&(rand_tensor(&[n, k], 1, DType::F32) * 4.0).unwrap()).unwrap();
        let hard = Tensor::new(&[0u32, 4, 2, 2, 1, 3, 0], &Device::Cpu).unwrap();
        let soft =
            candle_nn::ops::softmax(&rand_tensor(&[n, k], 2, DType::F32), D::Minus1).unwrap();
        for t in [Targets::Hard(hard.clone()), Targets::Soft(soft.clone())] {
            let ours = cross_entropy(&z, &t).unwrap();
            let logp = candle_nn::ops::log_softmax(&z, D::Minus1).unwrap();
            let want = match &t {
                Targets::Hard(h) => logp
                    .gather(&h.unsqueeze(1).unwrap(), 1)
                    .unwrap()
                    .mean_all()
                    .unwrap()
                    .neg()
                    .unwrap(),
                Targets::Soft(s) => ((logp * s).unwrap().sum_all().unwrap() / n as f64)
                    .unwrap()
                    .neg()
                    .unwrap(),
            };
            assert!(max_rel_err(&ours, &want) < 1e-5);
            let g1 = (ours * 3.0).unwrap().backward().unwrap();
            let g2 = (want * 3.0).unwrap().backward().unwrap();
            let (a, b) = (
                g1.get(z.as_tensor()).unwrap(),
                g2.get(z.as_tensor()).unwrap(),
            );
            assert!(max_rel_err(a, b) < 1e-5);
        }
        let z64 = rand_tensor(&[n, k], 3, DType::F64);
        let soft64 = soft.to_dtype(DType::F64).unwrap();
        check_grad_fd(
            |t| cross_entropy(t, &Targets::Hard(hard.clone())).unwrap(),
            &z64,
            1,
            1e-6,
            "hard",
        );
        check_grad_fd(
            |t| cross_entropy(t, &Targets::Soft(soft64.clone())).unwrap(),
            &z64,
            1,
            1e-6,
            "soft",
        );
        let bad = Targets::Hard(Tensor::new(&[0u32, 9, 0, 0, 0, 0, 0], &Device::Cpu).unwrap());
        let err = cross_entropy(&z, &bad).unwrap_err().to_string();
        assert!(err.contains("label 9"), "{err}");
    }
}

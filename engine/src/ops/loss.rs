//! Cross entropy with hard (class index) or soft (distribution) targets.

use candle_core::{DType, Result, Tensor, D};

/// What a batch's targets are: class indices (u32, [N]) or distributions (float, [N, K]).
#[derive(Debug, Clone)]
pub enum Targets {
    Hard(Tensor),
    Soft(Tensor),
}

/// Mean cross entropy of `logits` [N, K] against hard or soft targets.
pub fn cross_entropy(logits: &Tensor, targets: &Targets) -> Result<Tensor> {
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

/// How many rows of `logits` have their largest value at the target class.
pub fn top1_correct(logits: &Tensor, labels: &Tensor) -> Result<u64> {
    let pred = logits.argmax(D::Minus1)?;
    let eq = pred.eq(&labels.to_dtype(DType::U32)?)?;
    eq.to_dtype(DType::U32)?
        .sum_all()?
        .to_scalar::<u32>()
        .map(|v| v as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

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
}

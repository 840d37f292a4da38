//! The residual join of a ResNet block, `relu(a + b)`, as one pass forward and one backward (the
//! separate add, ReLU and ReLU-gradient ops of candle are four passes and three allocations).

use crate::{contiguous_slice, par_new};
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

/// Elements per parallel task.
const CHUNK: usize = 1 << 14;

/// `max(a + b, 0)` for two tensors of one shape.
pub fn add_relu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let fused = a.device().is_cpu()
        && matches!(a.dtype(), DType::F32 | DType::F64)
        && a.dtype() == b.dtype()
        && a.shape() == b.shape();
    if !fused {
        return (a + b)?.relu();
    }
    a.contiguous()?.apply_op2(&b.contiguous()?, AddRelu)
}

struct AddRelu;

/// `f(a[i], b[i])` for every element, in parallel chunks.
fn zip_map<T: WithDType>(a: &[T], b: &[T], f: impl Fn(T, T) -> T + Sync) -> Vec<T> {
    par_new(
        a.len(),
        CHUNK,
        a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)),
        |o, (a, b)| {
            for ((o, &x), &y) in o.iter_mut().zip(a).zip(b) {
                *o = f(x, y);
            }
        },
    )
}

fn add_relu_kernel<T: WithDType>(a: &[T], b: &[T]) -> Vec<T> {
    zip_map(a, b, |x, y| {
        let s = x + y;
        if s > T::zero() {
            s
        } else {
            T::zero()
        }
    })
}

/// dy where the output is positive, else 0.
fn relu_grad_kernel<T: WithDType>(dy: &[T], y: &[T]) -> Vec<T> {
    zip_map(dy, y, |g, y| if y > T::zero() { g } else { T::zero() })
}

impl CustomOp2 for AddRelu {
    fn name(&self) -> &'static str {
        "add_relu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = float_storage!(s1, "add_relu", |T| add_relu_kernel::<T>(
            contiguous_slice(s1, l1, "add_relu")?,
            contiguous_slice(s2, l2, "add_relu")?,
        ));
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        _a: &Tensor,
        _b: &Tensor,
        res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = relu_grad(&dy.contiguous()?, res)?;
        Ok((Some(g.clone()), Some(g)))
    }
}

/// The ReLU's input gradient: `dy` where the output `y` is positive, else 0 (both contiguous, on
/// CPU).
pub(crate) fn relu_grad(dy: &Tensor, y: &Tensor) -> Result<Tensor> {
    dy.apply_op2_no_bwd(y, &ReluGrad)
}

/// The ReLU's input gradient from (dy, output).
struct ReluGrad;

impl CustomOp2 for ReluGrad {
    fn name(&self) -> &'static str {
        "relu_grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = float_storage!(s1, "relu_grad", |T| relu_grad_kernel::<T>(
            contiguous_slice(s1, l1, "relu_grad")?,
            contiguous_slice(s2, l2, "relu_grad")?,
        ));
        Ok((out, l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{check_grad_fd, max_rel_err, rand_tensor};
    use candle_core::Var;

    #[test]
    fn matches_add_then_relu_forward_and_backward() {
        for shape in [vec![2, 3, 5, 7], vec![1, 1, 1, 1], vec![4, 70000]] {
            let a = Var::from_tensor(&rand_tensor(&shape, 1, DType::F32)).unwrap();
            let b = Var::from_tensor(&rand_tensor(&shape, 2, DType::F32)).unwrap();
            let ours = add_relu(&a, &b).unwrap();
            let want = (a.as_tensor() + b.as_tensor()).unwrap().relu().unwrap();
            assert_eq!(max_rel_err(&ours, &want), 0.0, "{shape:?}");
            let up = rand_tensor(&shape, 3, DType::F32);
            let g1 = (ours * &up).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (want * &up).unwrap().sum_all().unwrap().backward().unwrap();
            for v in [&a, &b] {
                let (x, y) = (
                    g1.get(v.as_tensor()).unwrap(),
                    g2.get(v.as_tensor()).unwrap(),
                );
                assert_eq!(max_rel_err(x, y), 0.0, "{shape:?}");
            }
        }
        let b = rand_tensor(&[2, 3, 4, 4], 5, DType::F64);
        check_grad_fd(
            |t| add_relu(t, &b).unwrap(),
            &rand_tensor(&[2, 3, 4, 4], 4, DType::F64),
            1,
            1e-6,
            "f64",
        );
    }
}

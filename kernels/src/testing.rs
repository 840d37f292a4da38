//! Helpers for the kernels' tests: seeded random tensors, error measures, and a gradient check
//! against central finite differences.

use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};

/// The seed of the engine's `rng::stream(seed, "ops-test")` (FNV-1a of the purpose, folded with
/// the seed through splitmix64), so that the tests draw the data they were written against when
/// the kernels lived in the engine: the finite-difference checks are tight enough that a point
/// drawn next to a ReLU's kink would fail them.
fn ops_test_seed(seed: u64) -> u64 {
    let splitmix = |z: u64| {
        let z = z.wrapping_add(0x9e3779b97f4a7c15);
        let z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
        let z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
        z ^ (z >> 31)
    };
    let h = b"ops-test".iter().fold(0xcbf29ce484222325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    });
    splitmix(seed ^ splitmix(h))
}

/// Uniform values in [-1, 1) from a seeded stream.
pub fn rand_tensor(shape: &[usize], seed: u64, dtype: DType) -> Tensor {
    let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(ops_test_seed(seed));
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| r.random_range(-1.0..1.0)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

fn to_f64(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// max |a - b| / max |b| (relative to the reference's scale).
pub fn max_rel_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let (a, b) = (to_f64(a), to_f64(b));
    let d = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max);
    d / b.iter().map(|v| v.abs()).fold(1e-12, f64::max)
}

/// Checks the gradient of `sum(f(x) * up)` (a random `up`) with respect to `x` against central
/// finite differences, at every `stride`-th element of `x` (f64). Panics with the first mismatch.
pub fn check_grad_fd(
    f: impl Fn(&Tensor) -> Tensor,
    x: &Tensor,
    stride: usize,
    tol: f64,
    what: &str,
) {
    let x = Var::from_tensor(&x.to_dtype(DType::F64).unwrap()).unwrap();
    let y = f(x.as_tensor());
    let up = rand_tensor(y.dims(), 99, DType::F64);
    let objective = |t: &Tensor| {
        (f(t) * &up)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let grads = (y * &up).unwrap().sum_all().unwrap().backward().unwrap();
    let g = to_f64(grads.get(x.as_tensor()).expect("x received no gradient"));
    let base = to_f64(x.as_tensor());
    let eps = 1e-6;
    for i in (0..base.len()).step_by(stride.max(1)) {
        let (mut a, mut b) = (base.clone(), base.clone());
        a[i] += eps;
        b[i] -= eps;
        let ta = Tensor::from_vec(a, x.dims(), &Device::Cpu).unwrap();
        let tb = Tensor::from_vec(b, x.dims(), &Device::Cpu).unwrap();
        let fd = (objective(&ta) - objective(&tb)) / (2.0 * eps);
        assert!(
            (fd - g[i]).abs() <= tol * fd.abs().max(1.0),
            "{what}: element {i}: finite difference {fd}, gradient {}",
            g[i]
        );
    }
}

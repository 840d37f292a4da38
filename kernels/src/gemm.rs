//! A safe front to the `gemm` crate's matrix product (the one candle uses), for the kernels.

use candle_core::WithDType;

/// A read-only matrix view: element (i, j) is `data[i * rs + j * cs]`, so a transpose is a swap of
/// strides.
#[derive(Clone, Copy)]
pub struct Mat<'a, T> {
    pub data: &'a [T],
    pub rs: usize,
    pub cs: usize,
}

impl<'a, T> Mat<'a, T> {
    /// A row-major matrix with `cols` columns.
    pub fn rows(data: &'a [T], cols: usize) -> Self {
        Mat {
            data,
            rs: cols,
            cs: 1,
        }
    }
    /// The transpose of a row-major matrix with `cols` columns.
    pub fn transposed(data: &'a [T], cols: usize) -> Self {
        Mat {
            data,
            rs: 1,
            cs: cols,
        }
    }
    pub(crate) fn fits(&self, r: usize, c: usize) -> bool {
        r == 0 || c == 0 || (r - 1) * self.rs + (c - 1) * self.cs < self.data.len()
    }
}

/// `dst` (row-major m x n) = a (m x k) * b (k x n), plus the old `dst` when `accumulate`.
/// Single-threaded: the kernels parallelise over images.
pub fn matmul<T: WithDType>(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [T],
    accumulate: bool,
    a: Mat<T>,
    b: Mat<T>,
) {
    matmul_threads(m, n, k, dst, accumulate, a, b, 1)
}

/// `matmul` on `threads` threads of the rayon pool (for one large product).
#[allow(clippy::too_many_arguments)]
pub fn matmul_threads<T: WithDType>(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [T],
    accumulate: bool,
    a: Mat<T>,
    b: Mat<T>,
    threads: usize,
) {
    assert!(
        dst.len() >= m * n && a.fits(m, k) && b.fits(k, n),
        "matmul: operand too small for {m}x{k} by {k}x{n}"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst[..m * n].fill(T::zero());
        }
        return;
    }
    // SAFETY: the assertion above keeps every index the strides reach inside the slices, `dst`
    // does not alias `a` or `b` (it is borrowed mutably), and T is f32 or f64 in this crate.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            T::one(),
            T::one(),
            false,
            false,
            false,
            if threads > 1 {
                gemm::Parallelism::Rayon(threads)
            } else {
                gemm::Parallelism::None
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_a_naive_product_with_transposes_and_accumulation() {
        let (m, n, k) = (3, 4, 5);
        let a: Vec<f64> = (0..m * k).map(|v| v as f64 * 0.5 - 3.0).collect();
        let b: Vec<f64> = (0..k * n).map(|v| (v as f64).sin()).collect();
        let mut want = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                want[i * n + j] = (0..k).map(|l| a[i * k + l] * b[l * n + j]).sum();
            }
        }
        let mut dst = vec![0.0; m * n];
        matmul(m, n, k, &mut dst, false, Mat::rows(&a, k), Mat::rows(&b, n));
        assert!(dst.iter().zip(&want).all(|(x, y)| (x - y).abs() < 1e-12));
        // b given transposed: bt is n x k row-major
        let bt: Vec<f64> = (0..n * k).map(|idx| b[(idx % k) * n + idx / k]).collect();
        matmul(
            m,
            n,
            k,
            &mut dst,
            true,
            Mat::rows(&a, k),
            Mat::transposed(&bt, k),
        );
        assert!(dst
            .iter()
            .zip(&want)
            .all(|(x, y)| (x - 2.0 * y).abs() < 1e-12));
    }
}

//! Criterion benches of single CPU kernels, reported in GFLOP/s ("Gelem/s" in criterion's output:
//! one element = one floating-point operation, direct-convolution count for convolutions) so they
//! compare with the machine's best matrix product (`matmul/2048`, and PyTorch's in
//! `benches/reference/throughput.py --matmul`).
//!
//!     cargo bench -p recipe-kernels --bench kernels            # all
//!     cargo bench -p recipe-kernels --bench kernels -- conv    # the convolutions only

use candle_core::{DType, Device, Tensor, Var};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use recipe_kernels::gemm::{matmul_threads, Mat};
use recipe_kernels::{self as ops, BatchNormStats, Conv2dParams};
use std::hint::black_box;

// The allocator of the `recipe` binary, with the same setting (`src/alloc.rs`: freed memory is
// kept for reuse, so steps do not pay page faults).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn keep_freed_memory() {
    // SAFETY: sets an integer option (15: `mi_option_purge_delay`); mimalloc reads options
    // atomically.
    unsafe { libmimalloc_sys::mi_option_set(15, -1) }
}

fn rand(shape: &[usize]) -> Tensor {
    Tensor::randn(0f32, 1.0, shape, &Device::Cpu).expect("random tensor")
}

fn matmul(c: &mut Criterion) {
    keep_freed_memory();
    let mut g = c.benchmark_group("matmul");
    g.sample_size(10);
    for n in [512usize, 2048] {
        let a: Vec<f32> = (0..n * n).map(|i| (i % 7) as f32 * 0.1).collect();
        let b = a.clone();
        let mut d = vec![0f32; n * n];
        g.throughput(Throughput::Elements(2 * (n * n * n) as u64));
        g.bench_function(BenchmarkId::new("f32_2_threads", n), |bch| {
            bch.iter(|| {
                matmul_threads(
                    n,
                    n,
                    n,
                    &mut d,
                    false,
                    Mat::rows(&a, n),
                    Mat::rows(&b, n),
                    2,
                );
                black_box(&d);
            })
        });
    }
    g.finish();
}

/// One thread, the per-image products of 3x3 convolutions (16 channels at 32x32, 32 at 28x28):
/// forward (O x L x CKK), kernel gradient as dy cols^T (O x CKK x L, cols read transposed) and
/// as cols dy^T (CKK x O x L, dy read transposed; the form conv.rs uses). Writing the forward
/// product transposed (L x O) measured the same and is not kept.
fn matmul_shapes(c: &mut Criterion) {
    let mut g = c.benchmark_group("matmul_shapes");
    g.sample_size(10);
    let (o, l, ckk) = (16usize, 1024usize, 144usize);
    let (o2, l2, ckk2) = (32usize, 784usize, 288usize);
    let k2: Vec<f32> = (0..o2 * ckk2).map(|i| (i % 5) as f32).collect();
    let cols2: Vec<f32> = (0..ckk2 * l2).map(|i| (i % 7) as f32).collect();
    let k: Vec<f32> = (0..o * ckk).map(|i| (i % 5) as f32).collect();
    let cols: Vec<f32> = (0..ckk * l).map(|i| (i % 7) as f32).collect();
    let dy: Vec<f32> = (0..o * l).map(|i| (i % 3) as f32).collect();
    let mut d = vec![0f32; o * l.max(ckk) * 9];
    g.throughput(Throughput::Elements(2 * (o * l * ckk) as u64));
    g.bench_function("forward_16x1024x144", |b| {
        b.iter(|| {
            matmul_threads(
                o,
                l,
                ckk,
                &mut d,
                false,
                Mat::rows(&k, ckk),
                Mat::rows(&cols, l),
                1,
            );
            black_box(&d);
        })
    });
    g.throughput(Throughput::Elements(2 * (o2 * l2 * ckk2) as u64));
    g.bench_function("forward_32x784x288", |b| {
        b.iter(|| {
            matmul_threads(
                o2,
                l2,
                ckk2,
                &mut d,
                false,
                Mat::rows(&k2, ckk2),
                Mat::rows(&cols2, l2),
                1,
            );
            black_box(&d);
        })
    });
    g.throughput(Throughput::Elements(2 * (o * l * ckk) as u64));
    g.bench_function("wgrad_16x144x1024", |b| {
        b.iter(|| {
            matmul_threads(
                o,
                ckk,
                l,
                &mut d,
                true,
                Mat::rows(&dy, l),
                Mat::transposed(&cols, l),
                1,
            );
            black_box(&d);
        })
    });
    g.bench_function("wgrad_t_144x16x1024", |b| {
        b.iter(|| {
            matmul_threads(
                ckk,
                o,
                l,
                &mut d,
                true,
                Mat::rows(&cols, l),
                Mat::transposed(&dy, l),
                1,
            );
            black_box(&d);
        })
    });
    g.finish();
}

/// The 3x3 convolutions of ResNet-20 (stages at 32, 16 and 8 pixels), the stem of the issue's
/// small ResNet, and a 1x1 stride-2 projection, at batch 128.
fn conv(c: &mut Criterion) {
    let mut g = c.benchmark_group("conv");
    g.sample_size(10);
    for (name, (n, ci, h, o, k, s, p)) in [
        ("r20_stage1_3x3_16", (128, 16, 32, 16, 3, 1, 1)),
        ("r20_stage2_3x3_32", (128, 32, 16, 32, 3, 1, 1)),
        ("r20_stage3_3x3_64", (128, 64, 8, 64, 3, 1, 1)),
        ("small_3x3_32_at_28", (128, 32, 28, 32, 3, 1, 1)),
        ("proj_1x1_s2_16_32", (128, 16, 32, 32, 1, 2, 0)),
        ("down_3x3_s2_16_32", (128, 16, 32, 32, 3, 2, 1)),
    ] {
        let x = Var::from_tensor(&rand(&[n, ci, h, h])).expect("var");
        let w = Var::from_tensor(&rand(&[o, ci, k, k])).expect("var");
        let params = Conv2dParams::new(s, p);
        let oh = (h + 2 * p - k) / s + 1;
        let flops = 2 * n * o * ci * k * k * oh * oh;
        g.throughput(Throughput::Elements(flops as u64));
        g.bench_function(BenchmarkId::new("forward", name), |b| {
            b.iter(|| black_box(ops::conv2d(&x, &w, None, params).expect("conv")))
        });
        let up = rand(&[n, o, oh, oh]);
        g.throughput(Throughput::Elements(2 * flops as u64));
        g.bench_function(BenchmarkId::new("backward", name), |b| {
            b.iter(|| {
                black_box(ops::conv2d_backward(&x, &w, &up, params, true, true).expect("grads"))
            })
        });
        // Each gradient alone.
        g.throughput(Throughput::Elements(flops as u64));
        for (what, input) in [("backward_input", true), ("backward_kernel", false)] {
            g.bench_function(BenchmarkId::new(what, name), |b| {
                b.iter(|| {
                    black_box(
                        ops::conv2d_backward(&x, &w, &up, params, input, !input).expect("grad"),
                    )
                })
            });
        }
    }
    g.finish();
}

fn batch_norm(c: &mut Criterion) {
    let mut g = c.benchmark_group("batch_norm");
    g.sample_size(10);
    let (n, ch, h) = (128, 16, 32);
    let x = Var::from_tensor(&rand(&[n, ch, h, h])).expect("var");
    let w = Var::ones(ch, DType::F32, &Device::Cpu).expect("var");
    let b = Var::zeros(ch, DType::F32, &Device::Cpu).expect("var");
    let rm = Var::zeros(ch, DType::F32, &Device::Cpu).expect("var");
    let rv = Var::ones(ch, DType::F32, &Device::Cpu).expect("var");
    let bn = || {
        let stats = BatchNormStats {
            running_mean: &rm,
            running_var: &rv,
            momentum: 0.1,
            sync: None,
        };
        ops::batch_norm(&x, &w, &b, stats, 1e-5, true, true).expect("batch norm")
    };
    g.throughput(Throughput::Bytes((n * ch * h * h * 4) as u64));
    g.bench_function("train_relu_forward_128x16x32x32", |bch| {
        bch.iter(|| black_box(bn()))
    });
    let loss = bn().sum_all().expect("sum");
    g.bench_function("train_relu_backward_128x16x32x32", |bch| {
        bch.iter(|| black_box(loss.backward().expect("backward")))
    });
    g.finish();
}

fn pool(c: &mut Criterion) {
    let mut g = c.benchmark_group("pool");
    g.sample_size(10);
    let x = Var::from_tensor(&rand(&[128, 32, 28, 28])).expect("var");
    g.throughput(Throughput::Bytes((128 * 32 * 28 * 28 * 4) as u64));
    g.bench_function("max_2x2_128x32x28x28_forward", |b| {
        b.iter(|| black_box(ops::max_pool2d(&x, 2, 2, 0).expect("pool")))
    });
    let loss = ops::max_pool2d(&x, 2, 2, 0)
        .and_then(|t| t.sum_all())
        .expect("loss");
    g.bench_function("max_2x2_128x32x28x28_backward", |b| {
        b.iter(|| black_box(loss.backward().expect("backward")))
    });
    g.finish();
}

criterion_group!(kernels, matmul, matmul_shapes, conv, batch_norm, pool);
criterion_main!(kernels);

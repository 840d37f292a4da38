//! Per-layer rates of the convolutions of ResNet-50 (batch 16, 224 px) or ResNet-20 (batch 128,
//! 32 px): for each distinct layer shape, the forward, input-gradient and kernel-gradient times
//! and GFLOP/s, and the total of the model's convolutions (each shape counted as often as the
//! model has it). `benches/reference/conv_layers.py` prints the same table for PyTorch.
//!
//! ```sh
//! RAYON_NUM_THREADS=2 cargo run --release -p recipe-kernels --example conv_layers -- resnet50 bf16
//! ```
//!
//! Arguments: the model (`resnet50`, `resnet20` or `small`, the small ResNet), the precision
//! (`fp32` or `bf16`), the rounds per measurement (default 5; the median is printed), and `--ab`
//! to time the per-image passes (`Paths::batched` off) against the defaults, `--ab-winograd`
//! the direct convolution (`Paths::winograd` off) against them, `--ab-winograd-kernel` the
//! kernel gradient without Winograd (`Paths::winograd_kernel` off), or `--ab-winograd4`
//! Winograd F(2x2, 3x3) (`Paths::winograd4` off), alternating in each round.

use candle_core::{Device, Tensor};
use recipe_kernels::{conv2d, conv2d_backward, set_paths, Conv2dParams, Paths, Switch};
use std::time::Instant;

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// One convolution of the model: input channels, output channels, kernel size, stride,
/// input height (= width), and how many times the model has it.
#[derive(Clone, Copy)]
struct Layer {
    c: usize,
    o: usize,
    k: usize,
    s: usize,
    h: usize,
    count: usize,
}

/// The layers from (c, o, k, s, h, count) rows.
fn layers(rows: &[(usize, usize, usize, usize, usize, usize)]) -> Vec<Layer> {
    let layer = |&(c, o, k, s, h, count)| Layer {
        c,
        o,
        k,
        s,
        h,
        count,
    };
    rows.iter().map(layer).collect()
}

fn resnet50() -> Vec<Layer> {
    layers(&[
        (3, 64, 7, 2, 224, 1),
        // stage 1, 56 px
        (64, 64, 1, 1, 56, 1),
        (64, 64, 3, 1, 56, 3),
        (64, 256, 1, 1, 56, 4), // conv3 x3 + downsample
        (256, 64, 1, 1, 56, 2),
        // stage 2, 28 px (stride on the 3x3)
        (256, 128, 1, 1, 56, 1),
        (128, 128, 3, 2, 56, 1),
        (256, 512, 1, 2, 56, 1),
        (128, 512, 1, 1, 28, 4),
        (512, 128, 1, 1, 28, 3),
        (128, 128, 3, 1, 28, 3),
        // stage 3, 14 px
        (512, 256, 1, 1, 28, 1),
        (256, 256, 3, 2, 28, 1),
        (512, 1024, 1, 2, 28, 1),
        (256, 1024, 1, 1, 14, 6),
        (1024, 256, 1, 1, 14, 5),
        (256, 256, 3, 1, 14, 5),
        // stage 4, 7 px
        (1024, 512, 1, 1, 14, 1),
        (512, 512, 3, 2, 14, 1),
        (1024, 2048, 1, 2, 14, 1),
        (512, 2048, 1, 1, 7, 3),
        (2048, 512, 1, 1, 7, 2),
        (512, 512, 3, 1, 7, 2),
    ])
}

fn resnet20() -> Vec<Layer> {
    layers(&[
        (3, 16, 3, 1, 32, 1),
        (16, 16, 3, 1, 32, 6),
        (16, 32, 3, 2, 32, 1),
        (16, 32, 1, 2, 32, 1),
        (32, 32, 3, 1, 16, 5),
        (32, 64, 3, 2, 16, 1),
        (32, 64, 1, 2, 16, 1),
        (64, 64, 3, 1, 8, 5),
    ])
}

/// The small ResNet of the throughput benchmark (batch 128, 1x28x28): a 3x3 stem and a basic
/// block at 28 px, the max pool, a basic block at 14 px.
fn small() -> Vec<Layer> {
    layers(&[
        (1, 32, 3, 1, 28, 1),
        (32, 32, 3, 1, 28, 2),
        (32, 32, 3, 1, 14, 2),
    ])
}

/// The median of `times`.
fn median(mut times: Vec<f64>) -> f64 {
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

/// The paths compared with `--ab`: the per-image passes (`Paths::batched` off) against the
/// defaults; with `--ab-winograd`, the direct convolution (`Paths::winograd` off) against them;
/// with `--ab-winograd-kernel`, the kernel gradient without Winograd (`Paths::winograd_kernel`
/// off) against them; with `--ab-winograd4`, Winograd F(2x2, 3x3) (`Paths::winograd4` off)
/// against them; one setting otherwise.
fn sides(ab: Option<&str>) -> Vec<(&'static str, Paths)> {
    let against_default = |label, paths| vec![(label, paths), ("default", Paths::default())];
    let d = Paths::default();
    match ab {
        Some("--ab") => against_default(
            "per image",
            Paths {
                batched: Switch::Off,
                ..d
            },
        ),
        Some("--ab-winograd-kernel") => against_default(
            "no winograd dk",
            Paths {
                winograd_kernel: Switch::Off,
                ..d
            },
        ),
        Some("--ab-winograd4") => against_default(
            "F(2x2,3x3)",
            Paths {
                winograd4: Switch::Off,
                ..d
            },
        ),
        Some(_) => against_default(
            "no winograd",
            Paths {
                winograd: Switch::Off,
                ..d
            },
        ),
        None => vec![("", recipe_kernels::paths())],
    }
}

fn main() -> candle_core::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flags = [
        "--ab",
        "--ab-winograd",
        "--ab-winograd-kernel",
        "--ab-winograd4",
    ];
    let ab = flags.into_iter().find(|f| args.iter().any(|a| a == f));
    let args: Vec<&String> = args
        .iter()
        .filter(|a| !flags.contains(&a.as_str()))
        .collect();
    let model = args.first().map_or("resnet50", |s| s.as_str());
    let bf16 = match args.get(1).map_or("fp32", |s| s.as_str()) {
        "fp32" => false,
        "bf16" => true,
        other => candle_core::bail!("precision {other:?}: use fp32 or bf16"),
    };
    let reps: usize = args.get(2).map_or(Ok(5), |r| r.parse()).map_err(|e| {
        candle_core::Error::Msg(format!("repetitions: {e}; give a whole number such as 5"))
    })?;
    let (layers, n) = match model {
        "resnet50" => (resnet50(), 16),
        "resnet20" => (resnet20(), 128),
        "small" => (small(), 128),
        other => candle_core::bail!("model {other:?}: use resnet50, resnet20 or small"),
    };
    let dev = Device::Cpu;
    let sides = sides(ab);
    println!(
        "{model} batch {n} {}, {} threads, median of {reps}{}",
        if bf16 { "bf16" } else { "fp32" },
        rayon::current_num_threads(),
        if ab.is_some() {
            " alternating rounds, per-image passes / default paths"
        } else {
            ""
        }
    );
    println!("| layer | count | fwd ms | dx ms | dk ms | fwd GF/s | dx GF/s | dk GF/s |");
    println!("|---|---|---|---|---|---|---|---|");
    let mut total = vec![[0.0f64; 3]; sides.len()];
    for l in layers {
        let pad = l.k / 2;
        let p = Conv2dParams::new(l.s, pad).with_bf16(bf16);
        let x = Tensor::randn(0f32, 1.0, (n, l.c, l.h, l.h), &dev)?;
        let w = Tensor::randn(0f32, 0.05, (l.o, l.c, l.k, l.k), &dev)?;
        let y = conv2d(&x, &w, None, p)?;
        let dy = Tensor::randn(0f32, 1.0, y.shape(), &dev)?;
        let oh = y.dim(2)?;
        let gflop = 2.0 * (n * l.o * oh * oh * l.c * l.k * l.k) as f64 / 1e9;
        let passes: [&dyn Fn() -> candle_core::Result<()>; 3] = [
            &|| conv2d(&x, &w, None, p).map(drop),
            &|| conv2d_backward(&x, &w, &dy, p, true, false).map(drop),
            &|| conv2d_backward(&x, &w, &dy, p, false, true).map(drop),
        ];
        // times[side][pass]: one warm-up, then `reps` rounds with the sides alternating
        let mut times = vec![vec![Vec::new(); 3]; sides.len()];
        for round in 0..=reps {
            for (si, (_, paths)) in sides.iter().enumerate() {
                set_paths(*paths);
                for (pi, pass) in passes.iter().enumerate() {
                    let t0 = Instant::now();
                    pass()?;
                    if round > 0 {
                        times[si][pi].push(t0.elapsed().as_secs_f64() * 1e3);
                    }
                }
            }
        }
        for (si, (name, _)) in sides.iter().enumerate() {
            let t: Vec<f64> = times[si].iter().map(|v| median(v.clone())).collect();
            for (acc, v) in total[si].iter_mut().zip(&t) {
                *acc += l.count as f64 * v;
            }
            println!(
                "| {}->{} {}x{} s{} {}px {name} | {} | {:.2} | {:.2} | {:.2} | {:.0} | {:.0} | {:.0} |",
                l.c,
                l.o,
                l.k,
                l.k,
                l.s,
                l.h,
                l.count,
                t[0],
                t[1],
                t[2],
                gflop / t[0] * 1e3,
                gflop / t[1] * 1e3,
                gflop / t[2] * 1e3
            );
        }
    }
    for (si, (name, _)) in sides.iter().enumerate() {
        let t = total[si];
        println!(
            "| all convolutions (x count) {name} | | {:.1} | {:.1} | {:.1} | | | |",
            t[0], t[1], t[2]
        );
    }
    Ok(())
}

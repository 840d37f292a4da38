#!/usr/bin/env python3
"""PyTorch twin of `cargo run --release -p recipe-kernels --example conv_layers`: per-layer
forward, input-gradient and kernel-gradient times of ResNet-50's (batch 16) or ResNet-20's
(batch 128) convolutions, in fp32 or in bf16 as `torch.autocast("cpu", torch.bfloat16)` runs them
(operands cast to bf16, `aten.convolution_backward` with one gradient asked at a time).

    python3 benches/reference/conv_layers.py resnet50 bf16 --threads 2

A measuring tool, never a dependency of the project.
"""

import argparse
import statistics
import time

import torch

RESNET50 = [
    (3, 64, 7, 2, 224, 1),
    (64, 64, 1, 1, 56, 1), (64, 64, 3, 1, 56, 3), (64, 256, 1, 1, 56, 4), (256, 64, 1, 1, 56, 2),
    (256, 128, 1, 1, 56, 1), (128, 128, 3, 2, 56, 1), (256, 512, 1, 2, 56, 1),
    (128, 512, 1, 1, 28, 4), (512, 128, 1, 1, 28, 3), (128, 128, 3, 1, 28, 3),
    (512, 256, 1, 1, 28, 1), (256, 256, 3, 2, 28, 1), (512, 1024, 1, 2, 28, 1),
    (256, 1024, 1, 1, 14, 6), (1024, 256, 1, 1, 14, 5), (256, 256, 3, 1, 14, 5),
    (1024, 512, 1, 1, 14, 1), (512, 512, 3, 2, 14, 1), (1024, 2048, 1, 2, 14, 1),
    (512, 2048, 1, 1, 7, 3), (2048, 512, 1, 1, 7, 2), (512, 512, 3, 1, 7, 2),
]
RESNET20 = [
    (3, 16, 3, 1, 32, 1), (16, 16, 3, 1, 32, 6), (16, 32, 3, 2, 32, 1), (16, 32, 1, 2, 32, 1),
    (32, 32, 3, 1, 16, 5), (32, 64, 3, 2, 16, 1), (32, 64, 1, 2, 16, 1), (64, 64, 3, 1, 8, 5),
]


def median_ms(reps, f):
    f()
    t = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f()
        t.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(t)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model", choices=["resnet50", "resnet20"])
    ap.add_argument("precision", choices=["fp32", "bf16"])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    layers, n = (RESNET50, 16) if a.model == "resnet50" else (RESNET20, 128)
    dt = torch.bfloat16 if a.precision == "bf16" else torch.float32
    conv_bwd = torch.ops.aten.convolution_backward
    print(f"{a.model} batch {n} {a.precision}, torch {torch.__version__}, {a.threads} threads, median of {a.reps}")
    print("| layer | count | fwd ms | dx ms | dk ms | fwd GF/s | dx GF/s | dk GF/s |")
    print("|---|---|---|---|---|---|---|---|")
    total = [0.0, 0.0, 0.0]
    with torch.no_grad():
        for c, o, k, s, h, count in layers:
            pad = k // 2
            x = torch.randn(n, c, h, h)
            w = torch.randn(o, c, k, k) * 0.05
            # autocast casts the f32 operands on every call: the casts are part of its time
            fwd = lambda: torch.nn.functional.conv2d(x.to(dt), w.to(dt), None, s, pad)
            y = fwd()
            dy = torch.randn(y.shape).to(dt)
            oh = y.shape[2]

            def grad(mask):
                return lambda: conv_bwd(dy, x.to(dt), w.to(dt), None, [s, s], [pad, pad], [1, 1],
                                        False, [0, 0], 1, mask)

            times = [median_ms(a.reps, fwd), median_ms(a.reps, grad([True, False, False])),
                     median_ms(a.reps, grad([False, True, False]))]
            gflop = 2.0 * n * o * oh * oh * c * k * k / 1e9
            for i in range(3):
                total[i] += count * times[i]
            f, dx, dk = times
            print(f"| {c}->{o} {k}x{k} s{s} {h}px | {count} | {f:.2f} | {dx:.2f} | {dk:.2f} | "
                  f"{gflop / f * 1e3:.0f} | {gflop / dx * 1e3:.0f} | {gflop / dk * 1e3:.0f} |")
    print(f"| all convolutions (x count) | | {total[0]:.1f} | {total[1]:.1f} | {total[2]:.1f} | | | |")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""recipe against PyTorch on this CPU, side by side in one run: training throughput of the same
models (benches/reference/throughput.py has them in PyTorch), each measurement in its own process,
the two implementations alternating, both on the same number of threads; then the machine's best
fp32 matrix product (PyTorch's, MKL) for the ratio to the limit. Prints a Markdown table.

    cargo build --release
    python3 benches/side_by_side.py --python /path/to/venv-with-torch/bin/python --rounds 5
    python3 benches/side_by_side.py --python /path/to/venv-with-torch/bin/python --precision amp_bf16

The table gives each side's median and range over the rounds (the order of the two sides swaps
every round) and the ratio of the medians.

Only the standard library here; PyTorch is needed in the interpreter given by --python.
"""

import argparse
import json
import statistics
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# (label, recipe --model block, reference --model, input, batch, classes, steps, warmup)
MODELS = [
    ("small ResNet (issue model)", "small_resnet", "small_resnet", "1x28x28", 128, 10, 20, 3),
    ("ResNet-20", "{name: resnet_cifar, depth: 20}", "resnet_cifar20", "3x32x32", 128, 10, 10, 2),
    ("ResNet-50", "{name: resnet, depth: 50}", "resnet50", "3x224x224", 16, 1000, 3, 1),
]


def run_json(cmd, env):
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{out.stderr}")
    lines = [l for l in out.stdout.splitlines() if l.startswith("{")]
    return json.loads(lines[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--python", default=sys.executable, help="an interpreter with torch")
    ap.add_argument("--recipe", default=os.path.join(ROOT, "target", "release", "recipe"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds per model")
    ap.add_argument("--only", help="run only models whose label contains this")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "amp_bf16"],
                    help="both sides in this precision: recipe's `precision: amp_bf16` against "
                         "PyTorch's CPU autocast to bfloat16")
    a = ap.parse_args()
    env = dict(os.environ, RAYON_NUM_THREADS=str(a.threads), OMP_NUM_THREADS=str(a.threads))
    ref = os.path.join(HERE, "reference", "throughput.py")
    rows = []
    for label, block, ref_name, inp, batch, classes, steps, warmup in MODELS:
        if a.only and a.only not in label:
            continue
        ours, theirs = [], []
        common = ["--input", inp, "--batch", str(batch), "--classes", str(classes),
                  "--steps", str(steps), "--warmup", str(warmup), "--json",
                  "--precision", a.precision]
        for r in range(a.rounds):
            # the order swaps every round, so neither side always runs after the other
            for side in ((0, 1) if r % 2 == 0 else (1, 0)):
                if side == 0:
                    ours.append(run_json([a.recipe, "bench", "throughput", "--model", block] + common, env))
                else:
                    theirs.append(run_json([a.python, ref, "--model", ref_name, "--threads",
                                            str(a.threads)] + common, env))
            print(f"{label}: recipe {ours[-1]['images_per_sec']:.1f}, "
                  f"torch {theirs[-1]['images_per_sec']:.1f} images/s", file=sys.stderr)
        rows.append((label, inp, batch, ours, theirs))
    mm = run_json([a.python, ref, "--matmul", "--threads", str(a.threads), "--json"], env)
    impl = rows[0][4][0]["impl"] if rows else ""
    print(f"\n{a.threads} threads; {a.precision}; medians of {a.rounds} alternating rounds; "
          f"{impl}; fp32 matmul 2048^3: {mm['matmul_gflops']:.0f} GFLOP/s (PyTorch)\n")
    print("| model | input | batch | recipe images/s median (range) | PyTorch images/s median (range) "
          "| ratio of medians | images per CPU-second: recipe / PyTorch (medians) "
          "| recipe fwd/bwd/opt ms | PyTorch fwd/bwd/opt ms | recipe peak RSS MB | PyTorch peak RSS MB (before model) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    med = lambda rs, k: statistics.median(r.get(k) or float("nan") for r in rs)
    for label, inp, batch, ours, theirs in rows:
        split = lambda rs: " / ".join(f"{med(rs, k):.1f}" for k in ("forward_ms", "backward_ms", "optimizer_ms"))
        spread = lambda rs: (f"{med(rs, 'images_per_sec'):.1f} "
                             f"({min(r['images_per_sec'] for r in rs):.1f}-{max(r['images_per_sec'] for r in rs):.1f})")
        ratio = med(ours, "images_per_sec") / med(theirs, "images_per_sec")
        print(f"| {label} | {inp} | {batch} | {spread(ours)} | {spread(theirs)} | {ratio:.2f}x "
              f"| {med(ours, 'images_per_cpu_sec'):.1f} / {med(theirs, 'images_per_cpu_sec'):.1f} "
              f"| {split(ours)} | {split(theirs)} | {med(ours, 'peak_rss_mb'):.0f} "
              f"| {med(theirs, 'peak_rss_mb'):.0f} ({med(theirs, 'start_rss_mb'):.0f}) |")

if __name__ == "__main__":
    main()

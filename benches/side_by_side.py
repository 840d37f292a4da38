#!/usr/bin/env python3
"""recipe against PyTorch on this CPU, side by side in one run: training throughput of the same
models (benches/reference/throughput.py has them in PyTorch), each measurement in its own process,
the two implementations alternating, both on the same number of threads; then the machine's best
fp32 matrix product (PyTorch's, MKL) for the ratio to the limit. Prints a Markdown table.

    cargo build --release
    python3 benches/side_by_side.py --python /path/to/venv-with-torch/bin/python

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
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds per model")
    ap.add_argument("--only", help="run only models whose label contains this")
    a = ap.parse_args()
    env = dict(os.environ, RAYON_NUM_THREADS=str(a.threads), OMP_NUM_THREADS=str(a.threads))
    ref = os.path.join(HERE, "reference", "throughput.py")
    rows = []
    for label, block, ref_name, inp, batch, classes, steps, warmup in MODELS:
        if a.only and a.only not in label:
            continue
        ours, theirs = [], []
        common = ["--input", inp, "--batch", str(batch), "--classes", str(classes),
                  "--steps", str(steps), "--warmup", str(warmup), "--json"]
        for _ in range(a.rounds):
            ours.append(run_json([a.recipe, "bench", "throughput", "--model", block] + common, env))
            theirs.append(run_json([a.python, ref, "--model", ref_name, "--threads",
                                    str(a.threads)] + common, env))
            print(f"{label}: recipe {ours[-1]['images_per_sec']:.1f}, "
                  f"torch {theirs[-1]['images_per_sec']:.1f} images/s", file=sys.stderr)
        best = lambda rs: max(rs, key=lambda r: r["images_per_sec"])
        rows.append((label, inp, batch, best(ours), best(theirs), ours, theirs))
    mm = run_json([a.python, ref, "--matmul", "--threads", str(a.threads), "--json"], env)
    print(f"\n{a.threads} threads; best of {a.rounds} alternating rounds; "
          f"{rows[0][4]['impl'] if rows else ''}; fp32 matmul 2048^3: "
          f"{mm['matmul_gflops']:.0f} GFLOP/s (PyTorch)\n")
    print("| model | input | batch | recipe images/s | PyTorch images/s | ratio | rounds: recipe (median, range) "
          "| rounds: PyTorch (median, range) | images per CPU-second: recipe / PyTorch (medians) "
          "| recipe fwd/bwd/opt ms | PyTorch fwd/bwd/opt ms | recipe peak RSS MB | PyTorch peak RSS MB (before model) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for label, inp, batch, o, t, ours, theirs in rows:
        split = lambda r: f"{r['forward_ms']:.1f} / {r['backward_ms']:.1f} / {r['optimizer_ms']:.1f}"
        spread = lambda rs: (f"{statistics.median(r['images_per_sec'] for r in rs):.1f} "
                             f"({min(r['images_per_sec'] for r in rs):.1f}-{max(r['images_per_sec'] for r in rs):.1f})")
        per_cpu = lambda rs: statistics.median(r.get("images_per_cpu_sec") or float("nan") for r in rs)
        print(f"| {label} | {inp} | {batch} | {o['images_per_sec']:.1f} | {t['images_per_sec']:.1f} "
              f"| {o['images_per_sec'] / t['images_per_sec']:.2f}x | {spread(ours)} | {spread(theirs)} "
              f"| {per_cpu(ours):.1f} / {per_cpu(theirs):.1f} | {split(o)} | {split(t)} "
              f"| {o['peak_rss_mb']:.0f} | {t['peak_rss_mb']:.0f} ({t['start_rss_mb']:.0f}) |")


if __name__ == "__main__":
    main()

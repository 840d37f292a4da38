#!/usr/bin/env python3
"""Data-parallel scaling on one machine: `recipe bench throughput` in 1 process and in N ranks
through mpirun (`--nproc N`, a binary built with `--features mpi`), one thread per rank, the
global batch the same, alternating the sides in every round. The table gives the median and the
range of the rounds of images/s, the scaling efficiency (N ranks' images/s over N times one
rank's, by the medians), CPU-ms per image (the ranks' user + system time over the measured
steps) and the all-reduce's time per step. With `--sync-batchnorm` the two sides are N ranks
with plain and with synchronised batch norm (`sync_batchnorm: true`), and the ratio column is
the synchronised side's images/s over the plain side's.

    python3 benches/dp_scaling.py target/release/recipe --ranks 2 --rounds 5
    python3 benches/dp_scaling.py target/release/recipe --ranks 2 --rounds 5 --sync-batchnorm
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from side_by_side import MODELS  # noqa: E402


def measure(binary, block, inp, batch, classes, steps, warmup, ranks, sync):
    cmd = [binary, "bench", "throughput", "--model", block, "--input", inp, "--batch", str(batch),
           "--classes", str(classes), "--steps", str(steps), "--warmup", str(warmup), "--json",
           "--nproc", str(ranks)] + (["--sync-batchnorm"] if sync else [])
    env = dict(os.environ, RAYON_NUM_THREADS="1")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{out.stderr}")
    line = [l for l in out.stdout.splitlines() if l.startswith("{")][-1]
    v = json.loads(line)
    cpu_ms = 1000 / v["images_per_cpu_sec"] if v.get("images_per_cpu_sec") else float("nan")
    return v["images_per_sec"], cpu_ms, v.get("allreduce_ms", 0.0)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("binary", help="a recipe binary built with --features mpi")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--only", help="only the models whose label contains this")
    ap.add_argument("--sync-batchnorm", action="store_true",
                    help="compare N ranks with plain and with synchronised batch norm")
    a = ap.parse_args()
    n = a.ranks
    # (label, ranks, sync); the ratio column is the second side over the first
    if a.sync_batchnorm:
        sides = [(f"{n} ranks", n, False), (f"{n} ranks sync BN", n, True)]
        ratio = "sync / plain"
    else:
        sides = [("1 rank", 1, False), (f"{n} ranks", n, False)]
        ratio = "efficiency"
    (la, _, _), (lb, _, _) = sides
    print(f"| model | {la} images/s median (range) | {lb} images/s median (range) "
          f"| {ratio} | CPU-ms/image {la} / {lb} | all-reduce ms/step {la} / {lb} |")
    print("|---|---|---|---|---|---|")
    for label, block, _ref, inp, batch, classes, steps, warmup in MODELS:
        if a.only and a.only not in label:
            continue
        runs = [[], []]
        for r in range(a.rounds):
            for k in ((0, 1) if r % 2 == 0 else (1, 0)):
                _, ranks, sync = sides[k]
                runs[k].append(measure(a.binary, block, inp, batch, classes, steps, warmup, ranks, sync))
        med = [statistics.median(x[0] for x in v) for v in runs]
        rng = [f"{min(x[0] for x in v):.1f}-{max(x[0] for x in v):.1f}" for v in runs]
        cpu = [statistics.median(x[1] for x in v) for v in runs]
        ar = [statistics.median(x[2] for x in v) for v in runs]
        scale = med[1] / med[0] if a.sync_batchnorm else med[1] / (n * med[0])
        print(f"| {label} | {med[0]:.1f} ({rng[0]}) | {med[1]:.1f} ({rng[1]}) | {scale:.2f} "
              f"| {cpu[0]:.2f} / {cpu[1]:.2f} | {ar[0]:.1f} / {ar[1]:.1f} |", flush=True)


if __name__ == "__main__":
    main()

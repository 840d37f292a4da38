#!/usr/bin/env python3
"""Data-parallel scaling on one machine: `recipe bench throughput` in 1 process and in N ranks
through mpirun (`--nproc N`, a binary built with `--features mpi`), one thread per rank, the
global batch the same, alternating the sides in every round. The table gives the median and the
range of the rounds of images/s, the scaling efficiency (N ranks' images/s over N times one
rank's, by the medians), CPU-ms per image (the ranks' user + system time over the measured
steps) and the all-reduce's time per step.

    python3 benches/dp_scaling.py target/release/recipe --ranks 2 --rounds 5
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from side_by_side import MODELS  # noqa: E402


def measure(binary, block, inp, batch, classes, steps, warmup, ranks):
    cmd = [binary, "bench", "throughput", "--model", block, "--input", inp, "--batch", str(batch),
           "--classes", str(classes), "--steps", str(steps), "--warmup", str(warmup), "--json",
           "--nproc", str(ranks)]
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
    a = ap.parse_args()
    n = a.ranks
    print(f"| model | 1 rank images/s median (range) | {n} ranks images/s median (range) "
          f"| efficiency | CPU-ms/image 1 / {n} | all-reduce ms/step |")
    print("|---|---|---|---|---|---|")
    for label, block, _ref, inp, batch, classes, steps, warmup in MODELS:
        if a.only and a.only not in label:
            continue
        runs = {1: [], n: []}
        for r in range(a.rounds):
            order = (1, n) if r % 2 == 0 else (n, 1)
            for k in order:
                runs[k].append(measure(a.binary, block, inp, batch, classes, steps, warmup, k))
        med = {k: statistics.median(x[0] for x in v) for k, v in runs.items()}
        lo = {k: min(x[0] for x in v) for k, v in runs.items()}
        hi = {k: max(x[0] for x in v) for k, v in runs.items()}
        cpu = {k: statistics.median(x[1] for x in v) for k, v in runs.items()}
        ar = statistics.median(x[2] for x in runs[n])
        print(f"| {label} | {med[1]:.1f} ({lo[1]:.1f}-{hi[1]:.1f}) | {med[n]:.1f} ({lo[n]:.1f}-{hi[n]:.1f}) "
              f"| {med[n] / (n * med[1]):.2f} | {cpu[1]:.2f} / {cpu[n]:.2f} | {ar:.1f} |", flush=True)


if __name__ == "__main__":
    main()

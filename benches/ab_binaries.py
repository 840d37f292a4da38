#!/usr/bin/env python3
"""Two `recipe` binaries side by side on the benchmark models (the models of side_by_side.py),
alternating A and B in every round, each measurement in its own process: whether a change
(a refactor, a kernel) moved training throughput. The machines are shared and wall time moves
between consecutive runs, so only alternating rounds compare; the table gives the median and the
range of the rounds, and CPU-seconds per image (user + system time of the process over the images
it trained, warmup steps included) beside wall time.

    python3 benches/ab_binaries.py OLD/recipe NEW/recipe --rounds 5 [--only ResNet-20]
    python3 benches/ab_binaries.py OLD/recipe NEW/recipe --only ResNet-20 \
        --bench-args "--nproc 2 --sync-batchnorm"      # data parallel (binaries built with mpi)
"""
import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from side_by_side import MODELS  # noqa: E402


def measure(binary, block, inp, batch, classes, steps, warmup, extra):
    cmd = [binary, "bench", "throughput", "--model", block, "--input", inp, "--batch", str(batch),
           "--classes", str(classes), "--steps", str(steps), "--warmup", str(warmup), "--json"] + extra
    before = os.times()
    out = subprocess.run(cmd, capture_output=True, text=True)
    after = os.times()
    if out.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{out.stderr}")
    line = [l for l in out.stdout.splitlines() if l.startswith("{")][-1]
    cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    return json.loads(line)["images_per_sec"], cpu / ((steps + warmup) * batch)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", help="binary A (the baseline)")
    ap.add_argument("b", help="binary B")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--only", help="only the models whose label contains this")
    ap.add_argument("--bench-args", default="",
                    help="more arguments for `recipe bench throughput`, both sides, e.g. \"--nproc 2\"")
    a = ap.parse_args()
    extra = shlex.split(a.bench_args)
    print("| model | A images/s median (range) | B images/s median (range) | B/A (medians) "
          "| A CPU-ms/image | B CPU-ms/image |")
    print("|---|---|---|---|---|---|")
    for label, block, _ref, inp, batch, classes, steps, warmup in MODELS:
        if a.only and a.only not in label:
            continue
        runs = {"a": [], "b": []}
        for r in range(a.rounds):
            # Alternate which side goes first, so neither always runs on a warmer machine.
            order = ("a", "b") if r % 2 == 0 else ("b", "a")
            for side in order:
                runs[side].append(measure(getattr(a, side), block, inp, batch, classes, steps, warmup, extra))
        cell = {}
        for side, v in runs.items():
            ips = [x[0] for x in v]
            cpu = [x[1] for x in v]
            cell[side] = (statistics.median(ips), min(ips), max(ips), 1000 * statistics.median(cpu))
        (ma, la, ha, ca), (mb, lb, hb, cb) = cell["a"], cell["b"]
        print(f"| {label} | {ma:.1f} ({la:.1f}-{ha:.1f}) | {mb:.1f} ({lb:.1f}-{hb:.1f}) | {mb / ma:.3f} "
              f"| {ca:.2f} | {cb:.2f} |", flush=True)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Time to accuracy against Composer on the same recipe and machine (issue 20): `recipe run
recipes/fashion_mnist_small_resnet.yaml` (in each --precision) and Composer's Trainer on the same
model, data, optimizer and schedule (benches/reference/composer_fashion_mnist.py), both on
--threads threads, the sides alternating in every round. The time is training wall time up to
the evaluation that first reaches --target (evaluation excluded on both sides).

    cargo build --release
    python3 benches/time_to_accuracy.py --python venv/bin/python --rounds 1

Prints a Markdown table: per side, the median and range over rounds of the training seconds to
the target, the final accuracy and the whole training time.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RECIPE = os.path.join(ROOT, "recipes", "fashion_mnist_small_resnet.yaml")


def ours(binary, precision, env, target):
    with tempfile.TemporaryDirectory() as d:
        run_dir = os.path.join(d, "run")
        cmd = [binary, "run", RECIPE, "-q", "--run-dir", run_dir, "--set", f"precision={precision}"]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"{' '.join(cmd)} failed:\n{out.stderr}")
        evals = []
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            for line in f:
                v = json.loads(line)
                if "eval/accuracy" in v:
                    evals.append((v["eval/accuracy"], v["time/train_sec"]))
    reached = next((t for acc, t in evals if acc >= target), None)
    return {"to_target": reached, "final": evals[-1][0], "train_sec": evals[-1][1]}


def composer(python, precision, threads, env, target):
    cmd = [python, os.path.join(HERE, "reference", "composer_fashion_mnist.py"), "--json",
           "--threads", str(threads), "--precision", precision, "--target", str(target)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{out.stderr}")
    v = json.loads([l for l in out.stdout.splitlines() if l.startswith("{")][-1])
    return {"to_target": v["train_sec_to_target"], "final": v["final_accuracy"],
            "train_sec": v["train_sec"], "impl": v["impl"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--python", default=sys.executable, help="an interpreter with mosaicml")
    ap.add_argument("--recipe", default=os.path.join(ROOT, "target", "release", "recipe"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--target", type=float, default=0.92)
    ap.add_argument("--precisions", default="fp32,amp_bf16",
                    help="recipe's precisions, each a side of its own (Composer runs in fp32)")
    ap.add_argument("--composer-precision", default="fp32", choices=["fp32", "amp_bf16"])
    a = ap.parse_args()
    env = dict(os.environ, RAYON_NUM_THREADS=str(a.threads), OMP_NUM_THREADS=str(a.threads))
    sides = [(f"recipe {p}", lambda p=p: ours(a.recipe, p, env, a.target))
             for p in a.precisions.split(",")]
    sides.append((f"Composer {a.composer_precision}",
                  lambda: composer(a.python, a.composer_precision, a.threads, env, a.target)))
    runs = {label: [] for label, _ in sides}
    for r in range(a.rounds):
        order = sides if r % 2 == 0 else sides[::-1]
        for label, f in order:
            runs[label].append(f())
            print(f"round {r + 1}: {label}: {runs[label][-1]}", file=sys.stderr, flush=True)
    med = lambda xs: statistics.median(xs) if xs else float("nan")
    base = runs[sides[-1][0]]
    base_t = med([x["to_target"] for x in base if x["to_target"] is not None])
    print(f"\n{a.threads} threads; target {a.target:.0%}; {a.rounds} round(s), sides alternating; "
          f"{base[0].get('impl', '')}\n")
    print("| side | train s to target, median (range) | speedup against Composer | final accuracy | train s, whole run |")
    print("|---|---|---|---|---|")
    for label, _ in sides:
        rs = runs[label]
        ts = [x["to_target"] for x in rs if x["to_target"] is not None]
        missed = len(rs) - len(ts)
        span = f"{med(ts):.1f} ({min(ts):.1f}-{max(ts):.1f})" if ts else "never"
        if missed and ts:
            span += f", {missed} of {len(rs)} never"
        speed = f"{base_t / med(ts):.2f}x" if ts else "-"
        print(f"| {label} | {span} | {speed} | {med([x['final'] for x in rs]):.4f} "
              f"| {med([x['train_sec'] for x in rs]):.1f} |")


if __name__ == "__main__":
    main()

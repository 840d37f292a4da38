#!/usr/bin/env python3
"""The per-algorithm table of benches/README.md from a `recipe bench sweep` over
benches/algorithm_variants.txt (results.json): per algorithm, the eval accuracy at each budget
(mean ± std over the seeds) and its difference from the baseline, and the training time (wall,
evaluation excluded) of the cells of one round, with its ratio to the baseline's in that round.

    python3 benches/algorithm_table.py benches/results/algorithms_fashion_mnist/results.json \
        --time-scale 0.25 --time-seed 1
"""
import argparse
import json
import statistics


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results")
    ap.add_argument("--baseline", default="baseline")
    ap.add_argument("--time-scale", type=float, required=True, help="the budget whose times are shown")
    ap.add_argument("--time-seed", type=int, required=True, help="the round whose times are shown")
    a = ap.parse_args()
    cells = json.load(open(a.results))["cells"]
    variants = list(dict.fromkeys(c["variant"] for c in cells))
    scales = sorted({c["scale"] for c in cells})

    def acc(v, s):
        x = [100 * c["accuracy"] for c in cells if c["variant"] == v and c["scale"] == s]
        return statistics.mean(x), (statistics.stdev(x) if len(x) > 1 else 0.0), len(x)

    def secs(v):
        for c in cells:
            if c["variant"] == v and c["scale"] == a.time_scale and c["seed"] == a.time_seed:
                return c.get("train_seconds") or c["wall_seconds"]
        return float("nan")

    head = "| algorithm | " + " | ".join(f"accuracy {s:g} (Δ)" for s in scales)
    head += f" | training s at {a.time_scale:g}, seed {a.time_seed} | time vs baseline |"
    print(head)
    print("|---" * (len(scales) + 3) + "|")
    base_t = secs(a.baseline)
    for v in variants:
        row = f"| {v} |"
        for s in scales:
            m, sd, n = acc(v, s)
            bm = acc(a.baseline, s)[0]
            delta = "" if v == a.baseline else f" ({m - bm:+.2f})"
            row += f" {m:.2f} ± {sd:.2f}{delta} |"
        t = secs(v)
        row += f" {t:.1f} | {t / base_t:.2f}x |"
        print(row)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""What each algorithm adds to a training step: `recipe bench throughput --trainer` with one
algorithm at a time (no callbacks), each run in its own process against a bare loop over the same
loader, model and optimizer in the same process; the algorithms alternate within every round.
Reports the algorithm's own time in `apply` per step (timed by the engine: what it costs, precise
even on a shared machine), and the trainer's step time and its excess over the bare loop (the net
effect on the step, within the machine's noise), median and range of the rounds. Algorithms that
change the work (selective backprop trains on part of the batch, progressive resizing on smaller
images) show it in the net effect.

    cargo build --release
    python3 benches/algorithm_cost.py target/release/recipe --rounds 3
"""
import argparse
import json
import statistics
import subprocess
import sys

ALGORITHMS = [
    ("none", "[]"),
    ("label_smoothing", "[{name: label_smoothing}]"),
    ("mixup", "[{name: mixup}]"),
    ("cutmix", "[{name: cutmix}]"),
    ("cutout", "[{name: cutout}]"),
    ("gradient_clipping (norm)", "[{name: gradient_clipping}]"),
    ("gradient_clipping (adaptive)", "[{name: gradient_clipping, clipping_type: adaptive, clipping_threshold: 0.01}]"),
    ("ema", "[{name: ema, half_life: 100ba}]"),
    ("selective_backprop (always on)", "[{name: selective_backprop, start: 0dur, end: 1dur, interrupt: 0}]"),
    ("progressive_resizing (scale 0.5 throughout)", "[{name: progressive_resizing, initial_scale: 0.5, delay: 1dur, finetune: 0dur}]"),
    ("colout", "[{name: colout}]"),
    ("randaugment", "[{name: randaugment}]"),
    ("augmix", "[{name: augmix}]"),
    ("sam (interval 1)", "[{name: sam}]"),
    ("sam (interval 10)", "[{name: sam, interval: 10}]"),
    ("swa (averaging from the start, every batch)", "[{name: swa, swa_start: 0dur, swa_end: 1dur, update_interval: 1ba}]"),
    ("blurpool", "[{name: blurpool}]"),
    ("squeeze_excite (min_channels 64)", "[{name: squeeze_excite, min_channels: 64}]"),
    ("ghost_batchnorm", "[{name: ghost_batchnorm}]"),
    ("weight_standardization", "[{name: weight_standardization}]"),
    ("stochastic_depth (block)", "[{name: stochastic_depth}]"),
    ("stochastic_depth (sample)", "[{name: stochastic_depth, stochastic_method: sample}]"),
    ("channels_last", "[{name: channels_last}]"),
]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("binary")
    ap.add_argument("--model", default="{name: resnet_cifar, depth: 20}")
    ap.add_argument("--input", default="1x28x28")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    res = {name: [] for name, _ in ALGORITHMS}
    for r in range(a.rounds):
        for name, algs in ALGORITHMS:
            cmd = [a.binary, "bench", "throughput", "--model", a.model, "--input", a.input,
                   "--batch", str(a.batch), "--steps", str(a.steps), "--warmup", str(a.warmup),
                   "--trainer", "--rounds", "1", "--callbacks", "none", "--algorithms", algs, "--json"]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                sys.exit(f"{name}: {out.stderr}")
            v = json.loads([l for l in out.stdout.splitlines() if l.startswith("{")][-1])
            t, b = v["trainer_ms"][0], v["bare_ms"][0]
            own = sum(v["apply_ms_per_step"][0].values())
            res[name].append((t, t - b, own))
            print(f"round {r + 1} {name}: step {t:.1f} ms, {t - b:+.1f} ms over the bare loop, own {own:.2f} ms",
                  file=sys.stderr)
    print(f"model {a.model}, input {a.input}, batch {a.batch}, {a.steps} timed steps, {a.rounds} alternating rounds\n")
    print("| algorithm | own time, ms per step, median [range] | step ms, median [range] | step over the bare loop, ms, median [range] |")
    print("|---|---|---|---|")
    for name, _ in ALGORITHMS:
        steps = [t for t, _, _ in res[name]]
        over = [x for _, x, _ in res[name]]
        own = [o for _, _, o in res[name]]
        print(f"| {name} | {statistics.median(own):.2f} [{min(own):.2f}-{max(own):.2f}] | "
              f"{statistics.median(steps):.1f} [{min(steps):.1f}-{max(steps):.1f}] | "
              f"{statistics.median(over):+.1f} [{min(over):+.1f} to {max(over):+.1f}] |")


if __name__ == "__main__":
    main()

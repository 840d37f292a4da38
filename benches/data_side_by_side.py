#!/usr/bin/env python3
"""`recipe bench data` beside torchvision's ImageFolder + DataLoader on the same JPEGs, same cores,
alternating in every round, each measurement in its own process. Reports the median and range of
the rounds' images/s and CPU-ms per image (user + system time of the process and its workers over
every image it made, startup included), plus the decoder's decode-only ceiling and the crop-112
rate with reduced-size decode on and off. Starting Python and importing torch costs several
CPU-seconds per process; it is measured in every round and taken out of torchvision's CPU figure.

    /tmp/torchenv/bin/python benches/make_photos.py /tmp/photos --count 3000
    python3 benches/data_side_by_side.py target/release/recipe /tmp/photos \\
        --python /tmp/torchenv/bin/python --rounds 5
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def cpu_of(cmd):
    """Runs `cmd`; returns its stdout and the CPU-seconds it and its children used."""
    before = os.times()
    out = subprocess.run(cmd, capture_output=True, text=True)
    after = os.times()
    if out.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{out.stderr}")
    cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    return out.stdout, cpu


def measure(cmd):
    stdout, cpu = cpu_of(cmd)
    rec = json.loads([l for l in stdout.splitlines() if l.startswith("{")][-1])
    return rec["images_per_sec"], cpu


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("binary")
    ap.add_argument("images")
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--batches", type=int, default=8)
    a = ap.parse_args()
    common = ["--images", a.images, "--batch", str(a.batch), "--batches", str(a.batches)]
    # Images each side makes per process: the first batch, the timed ones, and what the loaders
    # prefetch (recipe: 2 batches; torchvision: 2 per worker).
    workers = os.cpu_count()
    made = {"recipe": a.batch * (a.batches + 1 + 2), "torchvision": a.batch * (a.batches + 1 + 2 * workers)}
    cases = [
        ("recipe, crop 224", "recipe", [a.binary, "bench", "data", "--crop", "224", "--json"] + common),
        ("torchvision, crop 224", "torchvision",
         [a.python, os.path.join(HERE, "reference", "data_loader.py"), "--crop", "224"] + common),
        ("recipe, crop 112, reduced decode", "recipe", [a.binary, "bench", "data", "--crop", "112", "--json"] + common),
        ("recipe, crop 112, full decode", "recipe",
         [a.binary, "bench", "data", "--crop", "112", "--no-reduced-decode", "--json"] + common),
        ("torchvision, crop 112", "torchvision",
         [a.python, os.path.join(HERE, "reference", "data_loader.py"), "--crop", "112"] + common),
        ("decoder alone (mozjpeg, full size)", "decode",
         [a.binary, "bench", "data", "--decode-only", "--json"] + common),
    ]
    results = {name: [] for name, _, _ in cases}
    imports = []
    for r in range(a.rounds):
        imports.append(cpu_of([a.python, "-c", "import torch, torchvision.datasets, torchvision.transforms"])[1])
        for name, side, cmd in cases:
            ips, cpu = measure(cmd)
            if side == "torchvision":
                cpu -= imports[-1]
            n = a.batch * a.batches if side == "decode" else made[side]
            results[name].append((ips, 1e3 * cpu / n))
            print(f"round {r + 1} {name}: {ips:.0f} images/s, {1e3 * cpu / n:.2f} CPU-ms/image", file=sys.stderr)
    print(f"{workers} cores, batch {a.batch}, {a.batches} timed batches, {a.rounds} alternating rounds; "
          f"importing torch: {statistics.median(imports):.1f} CPU-s per process (taken out)\n")
    print("| pipeline | images/s, median [range] | CPU-ms per image, median |")
    print("|---|---|---|")
    for name, _, _ in cases:
        ips = [x for x, _ in results[name]]
        cpu = [c for _, c in results[name]]
        print(f"| {name} | {statistics.median(ips):.0f} [{min(ips):.0f}-{max(ips):.0f}] | {statistics.median(cpu):.2f} |")
    for crop in ["224", "112"]:
        ratios = [x / y for (x, _), (y, _) in zip(results[f"recipe, crop {crop}" + ("" if crop == "224" else ", reduced decode")],
                                                  results[f"torchvision, crop {crop}"])]
        print(f"\nrecipe / torchvision at crop {crop}, per round: median {statistics.median(ratios):.2f}x "
              f"[{min(ratios):.2f}-{max(ratios):.2f}]")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Composer's side of the time-to-accuracy comparison (issue 20): the small ResNet of
benches/reference/throughput.py on the full Fashion-MNIST read from Debian's idx files, trained by
Composer's Trainer with DecoupledSGDW (lr 0.1, momentum 0.9, weight decay 5e-4), a linear
schedule to zero, batch 128, 8 epochs, evaluated after every epoch, on --threads threads.
`recipes/fashion_mnist_small_resnet.yaml` is the same recipe for `recipe run`.

    python3 -m venv venv && venv/bin/pip install mosaicml torchvision
    venv/bin/python benches/reference/composer_fashion_mnist.py --json

Prints one JSON object: test accuracy after each epoch, the training wall time up to each
evaluation (evaluation excluded, as `recipe`'s time/train_sec) and the first such time at which
the accuracy reached --target. A measuring tool only: nothing in the project imports it.
"""
import argparse
import gzip
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from throughput import build  # noqa: E402  (the same small ResNet as the throughput bench)


def read_idx(path):
    import numpy as np
    with gzip.open(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=17)
    ap.add_argument("--target", type=float, default=0.92)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "amp_bf16"])
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    import torch
    import torch.nn as nn
    from torch.utils.data import DataLoader, TensorDataset
    from composer import Trainer, Callback
    from composer.models import ComposerClassifier
    from composer.optim import DecoupledSGDW, LinearScheduler

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)

    def tensors(split):
        x = read_idx(os.path.join(a.root, f"{split}-images-idx3-ubyte.gz"))
        y = read_idx(os.path.join(a.root, f"{split}-labels-idx1-ubyte.gz"))
        # the dataset's mean and std, as recipe's `normalize: true` for Fashion-MNIST
        x = (torch.from_numpy(x.copy()).float().div(255.0).sub(0.2860).div(0.3530)).unsqueeze(1)
        return TensorDataset(x, torch.from_numpy(y.copy()).long())

    train = DataLoader(tensors("train"), batch_size=a.batch, shuffle=True, drop_last=True)
    test = DataLoader(tensors("t10k"), batch_size=500)
    model = ComposerClassifier(build("small_resnet", 1, 10, nn), num_classes=10)
    opt = DecoupledSGDW(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)

    class Clock(Callback):
        """Training wall time up to each evaluation, evaluation excluded."""

        def __init__(self):
            self.train_sec, self.started, self.points = 0.0, None, []

        def fit_start(self, state, logger):
            self.started = time.perf_counter()

        def eval_start(self, state, logger):
            self.train_sec += time.perf_counter() - self.started

        def eval_end(self, state, logger):
            acc = float(state.eval_metric_values["MulticlassAccuracy"])
            self.points.append({"epoch": int(state.timestamp.epoch), "accuracy": acc,
                                "train_sec": self.train_sec})
            self.started = time.perf_counter()

    clock = Clock()
    wall0 = time.perf_counter()
    trainer = Trainer(
        model=model,
        train_dataloader=train,
        eval_dataloader=test,
        optimizers=opt,
        schedulers=LinearScheduler(alpha_i=1.0, alpha_f=0.0),
        max_duration=f"{a.epochs}ep",
        eval_interval="1ep",
        device="cpu",
        precision=a.precision,
        seed=a.seed,
        callbacks=[clock],
        progress_bar=False,
        log_to_console=False,
    )
    trainer.fit()
    wall = time.perf_counter() - wall0
    reached = next((p["train_sec"] for p in clock.points if p["accuracy"] >= a.target), None)
    import composer
    out = {
        "impl": f"composer {composer.__version__}, torch {torch.__version__}",
        "precision": a.precision,
        "threads": a.threads,
        "seed": a.seed,
        "target": a.target,
        "train_sec_to_target": reached,
        "final_accuracy": clock.points[-1]["accuracy"] if clock.points else None,
        "train_sec": clock.train_sec,
        "wall_sec": wall,
        "evals": clock.points,
    }
    print(json.dumps(out) if a.json else json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

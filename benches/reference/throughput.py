#!/usr/bin/env python3
"""PyTorch reference for `recipe bench throughput`: the same models, the same synthetic batch, the
same step (forward with the loss, backward, SGD with momentum 0.9), the same figures, so both are
measured side by side on one machine in one run (see benches/side_by_side.sh).

    python3 benches/reference/throughput.py --model small_resnet --input 1x28x28 --batch 128
    python3 benches/reference/throughput.py --matmul      # the machine's best fp32 matrix product

It needs only `torch` (no torchvision: the models are written out here, layer for layer the
layout of engine/src/models/resnet.rs). It is a measuring tool, never a dependency of the project.
Output: one line in the format of `recipe bench throughput`, and with --json a JSON object.
"""

import argparse
import json
import os
import resource
import sys
import time


def rss_mb(field):
    """VmRSS or VmHWM of this process, in MB (what recipe's sysinfo reads too)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def build(name, in_ch, classes, nn):
    def conv_bn(cin, cout, k, stride, pad):
        return [nn.Conv2d(cin, cout, k, stride, pad, bias=False), nn.BatchNorm2d(cout)]

    class Basic(nn.Module):
        def __init__(self, cin, planes, stride):
            super().__init__()
            c1, b1 = conv_bn(cin, planes, 3, stride, 1)
            c2, b2 = conv_bn(planes, planes, 3, 1, 1)
            self.conv1, self.bn1, self.conv2, self.bn2 = c1, b1, c2, b2
            self.relu = nn.ReLU(inplace=True)
            self.downsample = (
                nn.Sequential(*conv_bn(cin, planes, 1, stride, 0))
                if stride != 1 or cin != planes
                else None
            )

        def forward(self, x):
            h = self.relu(self.bn1(self.conv1(x)))
            h = self.bn2(self.conv2(h))
            s = x if self.downsample is None else self.downsample(x)
            return self.relu(h + s)

    class Bottleneck(nn.Module):
        def __init__(self, cin, planes, stride):
            super().__init__()
            out = planes * 4
            self.conv1, self.bn1 = conv_bn(cin, planes, 1, 1, 0)
            self.conv2, self.bn2 = conv_bn(planes, planes, 3, stride, 1)
            self.conv3, self.bn3 = conv_bn(planes, out, 1, 1, 0)
            self.relu = nn.ReLU(inplace=True)
            self.downsample = (
                nn.Sequential(*conv_bn(cin, out, 1, stride, 0))
                if stride != 1 or cin != out
                else None
            )

        def forward(self, x):
            h = self.relu(self.bn1(self.conv1(x)))
            h = self.relu(self.bn2(self.conv2(h)))
            h = self.bn3(self.conv3(h))
            s = x if self.downsample is None else self.downsample(x)
            return self.relu(h + s)

    def stages(block, cin, planes, depths, expansion):
        layers = []
        for s, (p, d) in enumerate(zip(planes, depths)):
            for i in range(d):
                stride = 2 if (i == 0 and s > 0) else 1
                layers.append(block(cin, p, stride))
                cin = p * expansion
        return layers, cin

    if name == "small_resnet":
        # The model: 3x3 stem to 32 channels, a basic block at full size, 2x2 max pool,
        # a basic block at half size, global average pool, linear.
        return nn.Sequential(
            *conv_bn(in_ch, 32, 3, 1, 1),
            nn.ReLU(inplace=True),
            Basic(32, 32, 1),
            nn.MaxPool2d(2, 2),
            Basic(32, 32, 1),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(32, classes),
        )
    if name.startswith("resnet_cifar"):
        depth = int(name[len("resnet_cifar"):] or 20)
        n = (depth - 2) // 6
        body, c = stages(Basic, 16, [16, 32, 64], [n, n, n], 1)
        return nn.Sequential(
            *conv_bn(in_ch, 16, 3, 1, 1),
            nn.ReLU(inplace=True),
            *body,
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(c, classes),
        )
    if name == "resnet50":
        body, c = stages(Bottleneck, 64, [64, 128, 256, 512], [3, 4, 6, 3], 4)
        return nn.Sequential(
            *conv_bn(in_ch, 64, 7, 2, 3),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
            *body,
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(c, classes),
        )
    sys.exit(f"--model {name}: use small_resnet, resnet_cifar20 (any 6n+2) or resnet50")


def matmul_rate(torch, size, repeats):
    a = torch.randn(size, size)
    b = torch.randn(size, size)
    c = torch.empty(size, size)
    for _ in range(3):
        torch.mm(a, b, out=c)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b, out=c)
        best = min(best, time.perf_counter() - t)
    return 2.0 * size**3 / best / 1e9


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="small_resnet")
    ap.add_argument("--input", default="3x32x32", help="CxHxW")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--matmul", action="store_true", help="measure the best fp32 matmul instead")
    ap.add_argument("--size", type=int, default=2048, help="matmul size (with --matmul)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (as `recipe bench throughput --device`)")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "amp_bf16"],
                    help="amp_bf16: forward and loss under torch.autocast(bfloat16), as Composer's "
                         "precision: amp_bf16 (the recipe's key of the same name)")
    a = ap.parse_args()
    try:
        import torch
        import torch.nn as nn
    except ImportError:
        sys.exit("PyTorch is not installed: pip install torch (a measuring tool only)")
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    if a.matmul:
        g = matmul_rate(torch, a.size, 10)
        out = {"matmul_gflops": g, "size": a.size, "threads": a.threads, "torch": torch.__version__}
        print(json.dumps(out) if a.json else
              f"torch {torch.__version__} fp32 matmul {a.size}^3, {a.threads} threads: {g:.1f} GFLOP/s")
        return
    c, h, w = (int(v) for v in a.input.split("x"))
    rss0 = rss_mb("VmRSS")
    dev = torch.device(a.device)
    # a GPU queues its kernels: wait for them before reading the clock (no-op on CPU)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    model = build(a.model, c, a.classes, nn).to(dev)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = (torch.rand(a.batch, c, h, w) * 2 - 1).to(dev)
    y = (torch.arange(a.batch) % a.classes).to(dev)
    loss_fn = nn.CrossEntropyLoss()
    autocast = lambda: torch.autocast(device_type=dev.type, dtype=torch.bfloat16,
                                      enabled=a.precision == "amp_bf16")
    f = b = o = 0.0
    cpu0 = None
    for step in range(a.warmup + a.steps):
        if step == a.warmup:
            t = os.times()
            cpu0 = t.user + t.system
        t0 = time.perf_counter()
        with autocast():
            loss = loss_fn(model(x), y)
        loss.item()
        t1 = time.perf_counter()
        loss.backward()
        sync()
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        t3 = time.perf_counter()
        if step >= a.warmup:
            f += t1 - t0
            b += t2 - t1
            o += t3 - t2
    n = a.steps
    t = os.times()
    cpu = t.user + t.system - cpu0
    out = {
        "impl": f"torch {torch.__version__}",
        "model": a.model,
        "batch": a.batch,
        "input": a.input,
        "threads": a.threads,
        "device": a.device,
        "precision": a.precision,
        "images_per_sec": a.batch * n / (f + b + o),
        # Per CPU-second of the process (user + system, every thread): what a shared machine's
        # other load disturbs far less than wall time.
        "images_per_cpu_sec": a.batch * n / cpu if cpu > 0 else None,
        "forward_ms": 1e3 * f / n,
        "backward_ms": 1e3 * b / n,
        "optimizer_ms": 1e3 * o / n,
        "peak_rss_mb": rss_mb("VmHWM"),
        "start_rss_mb": rss0,
    }
    if a.json:
        print(json.dumps(out))
    else:
        print(
            f"torch {torch.__version__} model {a.model} batch {a.batch} input {a.input}: "
            f"{out['images_per_sec']:.1f} images/s; per step forward {out['forward_ms']:.1f} ms, "
            f"backward {out['backward_ms']:.1f} ms, optimizer {out['optimizer_ms']:.1f} ms; "
            f"peak RSS {out['peak_rss_mb']:.0f} MB ({out['start_rss_mb']:.0f} MB before the model)"
        )


if __name__ == "__main__":
    main()

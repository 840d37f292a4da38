#!/usr/bin/env python3
"""torchvision's ImageFolder + DataLoader (PIL decode, RandomResizedCrop, RandomHorizontalFlip,
ToTensor, Normalize; num_workers = cores), the reference for `recipe bench data`: images/s over
`--batches` batches after the first (which starts the workers). Prints one JSON line.

    /tmp/torchenv/bin/python benches/reference/data_loader.py --images /tmp/photos --crop 224
"""
import argparse
import json
import os
import time

import torch
from torchvision import datasets, transforms


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", required=True)
    ap.add_argument("--crop", type=int, default=224)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    a = ap.parse_args()
    torch.set_num_threads(1)
    tf = transforms.Compose([
        transforms.RandomResizedCrop(a.crop),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ])
    ds = datasets.ImageFolder(a.images, transform=tf)
    dl = torch.utils.data.DataLoader(ds, batch_size=a.batch, shuffle=True, num_workers=a.workers,
                                     drop_last=True)
    it = iter(dl)
    next(it)
    t0 = time.perf_counter()
    for _ in range(a.batches):
        next(it)
    secs = time.perf_counter() - t0
    del it
    print(json.dumps({"impl": "torchvision", "what": f"RandomResizedCrop {a.crop} + flip + normalise, batch {a.batch}",
                      "images": a.batch * a.batches, "images_per_sec": a.batch * a.batches / secs,
                      "workers": a.workers, "torch": torch.__version__}))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""ImageNet-like JPEGs for `recipe bench data`, made from the real photographs that scikit-image
ships (astronaut, chelsea, coffee, the motorcycle pair, rocket, retina, Hubble deep field, brick,
grass, gravel, camera): random crops of 40-100% of each photo, resized to 500x375 (a quarter
portrait, 375x500, as in ImageNet), saved at JPEG quality 90 into class folders. Nothing is
downloaded: the photos come with the PyPI package.

    python3 -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install scikit-image pillow torch torchvision
    /tmp/torchenv/bin/python benches/make_photos.py /tmp/photos --count 3000
"""
import argparse
import os
import random

from PIL import Image
import skimage.data

PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png", "motorcycle_left.png", "motorcycle_right.png",
          "rocket.jpg", "retina.jpg", "hubble_deep_field.jpg", "brick.png", "grass.png", "gravel.png",
          "camera.png"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--count", type=int, default=3000)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    folder = os.path.dirname(skimage.data.__file__)
    photos = [Image.open(os.path.join(folder, name)).convert("RGB") for name in PHOTOS]
    for c in range(a.classes):
        os.makedirs(os.path.join(a.out, f"c{c:02d}"), exist_ok=True)
    for i in range(a.count):
        src = photos[i % len(photos)]
        w, h = src.size
        frac = rng.uniform(0.4, 1.0) ** 0.5
        cw, ch = max(16, int(w * frac)), max(16, int(h * frac))
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        size = (375, 500) if rng.random() < 0.25 else (500, 375)
        img = src.crop((x, y, x + cw, y + ch)).resize(size, Image.BILINEAR)
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        img.save(os.path.join(a.out, f"c{i % a.classes:02d}", f"img{i:05d}.jpg"), quality=90)
    print(f"wrote {a.count} JPEGs into {a.out}")


if __name__ == "__main__":
    main()

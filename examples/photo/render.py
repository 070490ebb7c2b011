#!/usr/bin/env python3
"""Renders the example photo (a dog on a lawn, on a red leash) and the leash mask.

    python3 examples/photo/render.py [--out-dir examples/photo]

Writes `dog-on-lawn.jpg` (1024x768) and `leash-mask.png` (white = the leash, what
`pawfect-worker inpaint` removes). Deterministic: the same files for the same numpy/pillow.
Needs numpy and pillow (both in tools/requirements.txt).
"""

import argparse
import math
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

W, H = 1024, 768
SEED = 7


def lawn(rng: np.random.Generator) -> Image.Image:
    """Grass: a green gradient, low-frequency patches, then thousands of short blades."""
    y = np.linspace(0.0, 1.0, H)[:, None]
    base = np.zeros((H, W, 3), np.float32)
    base[..., 0] = 62 + 18 * y
    base[..., 1] = 112 + 40 * y
    base[..., 2] = 38 + 10 * y
    # Patches of lighter and darker grass.
    noise = rng.normal(0, 1, (H // 32 + 1, W // 32 + 1)).astype(np.float32)
    patches = np.array(
        Image.fromarray(noise).resize((W, H), Image.BICUBIC), dtype=np.float32
    )
    base += patches[..., None] * np.array([6, 12, 4], np.float32)
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(26000):
        x = rng.uniform(0, W)
        yb = rng.uniform(0, H + 20)
        depth = yb / H  # blades are longer in the foreground
        length = 6 + 16 * depth * rng.uniform(0.6, 1.2)
        angle = rng.normal(-math.pi / 2, 0.25)
        x2 = x + length * math.cos(angle)
        y2 = yb + length * math.sin(angle)
        shade = rng.uniform(0.7, 1.35)
        colour = (
            int(np.clip(55 * shade, 0, 255)),
            int(np.clip(125 * shade, 0, 255)),
            int(np.clip(40 * shade, 0, 255)),
        )
        draw.line([(x, yb), (x2, y2)], fill=colour, width=1 if depth < 0.5 else 2)
    return img.filter(ImageFilter.GaussianBlur(0.6))


def dog(img: Image.Image) -> None:
    """A sitting beagle-ish dog with a blue collar, its shadow first."""
    shadow = Image.new("L", (W, H), 0)
    ImageDraw.Draw(shadow).ellipse([470, 560, 800, 640], fill=110)
    shadow = shadow.filter(ImageFilter.GaussianBlur(18))
    dark = Image.new("RGB", (W, H), (20, 45, 15))
    img.paste(dark, (0, 0), shadow)

    d = ImageDraw.Draw(img)
    tan, white, brown = (196, 140, 80), (238, 232, 220), (110, 70, 38)
    d.ellipse([520, 380, 760, 610], fill=tan)  # body
    d.ellipse([575, 450, 700, 615], fill=white)  # chest
    d.ellipse([530, 560, 610, 625], fill=tan)  # back leg
    d.ellipse([600, 570, 650, 630], fill=white)  # front paws
    d.ellipse([665, 570, 715, 630], fill=white)
    d.polygon([(740, 520), (800, 430), (812, 438), (760, 540)], fill=tan)  # tail
    d.ellipse([560, 250, 720, 400], fill=tan)  # head
    d.ellipse([615, 320, 690, 400], fill=white)  # muzzle
    d.ellipse([640, 335, 665, 352], fill=(30, 25, 25))  # nose
    d.ellipse([600, 300, 614, 314], fill=(30, 25, 25))  # eyes
    d.ellipse([664, 300, 678, 314], fill=(30, 25, 25))
    d.ellipse([540, 265, 595, 380], fill=brown)  # ears
    d.ellipse([685, 265, 740, 380], fill=brown)
    d.chord([565, 380, 715, 430], 0, 180, fill=(40, 70, 170))  # collar
    d.ellipse([630, 412, 648, 430], fill=(200, 180, 60))  # ring


def leash_path() -> list:
    """From the collar ring up and to the left, out of the frame (where the owner stands)."""
    p0, p1, p2, p3 = (639, 425), (470, 640), (170, 330), (20, -10)
    pts = []
    for i in range(161):
        t = i / 160
        x = (1 - t) ** 3 * p0[0] + 3 * (1 - t) ** 2 * t * p1[0] + 3 * (1 - t) * t**2 * p2[0] + t**3 * p3[0]
        y = (1 - t) ** 3 * p0[1] + 3 * (1 - t) ** 2 * t * p1[1] + 3 * (1 - t) * t**2 * p2[1] + t**3 * p3[1]
        pts.append((x, y))
    return pts


def leash(img: Image.Image, mask: Image.Image) -> None:
    pts = leash_path()
    d = ImageDraw.Draw(img)
    d.line(pts, fill=(150, 20, 25), width=9, joint="curve")
    d.line([(x - 1.5, y - 1.5) for x, y in pts], fill=(205, 50, 50), width=3, joint="curve")
    # The mask covers the strap with a small margin, as a person would paint it.
    ImageDraw.Draw(mask).line(pts, fill=255, width=13, joint="curve")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", default=os.path.dirname(os.path.abspath(__file__)))
    args = ap.parse_args()
    rng = np.random.default_rng(SEED)
    img = lawn(rng)
    dog(img)
    mask = Image.new("L", (W, H), 0)
    leash(img, mask)
    os.makedirs(args.out_dir, exist_ok=True)
    img.save(os.path.join(args.out_dir, "dog-on-lawn.jpg"), quality=90, optimize=True)
    mask.save(os.path.join(args.out_dir, "leash-mask.png"), optimize=True)
    print(f"wrote dog-on-lawn.jpg and leash-mask.png ({W}x{H}) to {args.out_dir}")


if __name__ == "__main__":
    main()

"""Which of its two passes the installed Pillow runs first in a bilinear resize.

freqtag resizes as Pillow 12.3 does: the horizontal pass into 8-bit rows, then the vertical one
(README, "Inputs"). Pillow 13.0 runs the vertical pass first for some shapes. This script
resizes random images of random shapes with `Image.resize(..., BILINEAR)` and compares each
result, bit for bit, with the two orders done by hand (two one-axis resizes), then prints how
many matched which order and the shapes where the vertical pass came first, so that a rule can
be looked for. Not part of the tests.

    python tests/python/pillow_pass_order.py [CASES] [SEED]
"""

import random
import sys

import numpy as np
from PIL import Image, __version__


def main() -> int:
    cases = int(sys.argv[1]) if len(sys.argv) > 1 else 600
    seed = int(sys.argv[2]) if len(sys.argv) > 2 else 7
    rng = random.Random(seed)
    counts = {"horizontal first": 0, "vertical first": 0, "either": 0, "neither": 0}
    vertical = []
    for t in range(cases):
        w, h = rng.randint(20, 700), rng.randint(20, 700)
        if t % 3 == 0:
            nw, nh = rng.randint(10, 800), rng.randint(10, 800)
        else:
            # torchvision's Resize(short): the long side truncated
            short = rng.choice([32, 64, 128, 224, 256, 300])
            s, l = (w, h) if w <= h else (h, w)
            nl = int(short * l / s)
            nw, nh = (short, nl) if w <= h else (nl, short)
        if nw == w or nh == h:
            continue
        pixels = np.random.default_rng(t).integers(0, 256, (h, w, 3), dtype=np.uint8)
        img = Image.fromarray(pixels)
        full = np.asarray(img.resize((nw, nh), Image.BILINEAR))
        hv = img.resize((nw, h), Image.BILINEAR).resize((nw, nh), Image.BILINEAR)
        vh = img.resize((w, nh), Image.BILINEAR).resize((nw, nh), Image.BILINEAR)
        by_h, by_v = (full == np.asarray(hv)).all(), (full == np.asarray(vh)).all()
        if by_h and by_v:
            counts["either"] += 1
        elif by_h:
            counts["horizontal first"] += 1
        elif by_v:
            counts["vertical first"] += 1
            vertical.append((w, h, nw, nh))
        else:
            counts["neither"] += 1
    print(f"Pillow {__version__}: {counts}")
    for w, h, nw, nh in vertical:
        print(f"vertical first: {w}x{h} -> {nw}x{nh} (scale x {w / nw:.4f}, y {h / nh:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

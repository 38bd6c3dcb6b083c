"""Which of its two passes the installed Pillow runs first in a bilinear resize.

freqtag resizes in Pillow 13's order by default (`source.pillow = 13`): the vertical pass first
where the height shrinks by more than twice as many pixels as the width (`ImagingResampleInner`
in Pillow's `libImaging/Resample.c`), else the horizontal one; Pillow 12 runs the horizontal pass
first (README, "Inputs"). This script resizes random images of random shapes with
`Image.resize(..., BILINEAR)` and compares each result, bit for bit, with the two orders done by
hand (two one-axis resizes), then prints how many matched which order, the shapes where the
vertical pass came first, and how many results Pillow 13's rule predicts. Not part of the tests.

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
    rule = {"as the rule": 0, "against it": 0}
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
        # Pillow 13's rule
        v_first = (h - nh) > 0 and (h - nh) > 2 * (w - nw)
        rule["as the rule" if (by_v if v_first else by_h) else "against it"] += 1
        if by_h and by_v:
            counts["either"] += 1
        elif by_h:
            counts["horizontal first"] += 1
        elif by_v:
            counts["vertical first"] += 1
            vertical.append((w, h, nw, nh))
        else:
            counts["neither"] += 1
    print(f"Pillow {__version__}: {counts}; Pillow 13's order: {rule}")
    for w, h, nw, nh in vertical:
        print(f"vertical first: {w}x{h} -> {nw}x{nh} (scale x {w / nw:.4f}, y {h / nh:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Re-encodes the images of a list file (`path label` lines) as lossless PNG, decoded once by
Pillow, and writes a list of the PNGs beside them: with the same pixels on both sides, freqtag and
the numpy references compare networks, not JPEG decoders (libjpeg and the Rust decoder differ by a
level in some pixels, which flips a few predictions of a badly pruned network).

Usage: to_png.py LIST OUT_DIR   -> OUT_DIR/*.png and OUT_DIR/list.txt
"""

import sys
from pathlib import Path

from PIL import Image


def main() -> int:
    src, out = Path(sys.argv[1]), Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, line in enumerate(src.read_text().splitlines()):
        line = line.split("#")[0].strip()
        if not line:
            continue
        path, label = line.split()[:2]
        p = Path(path) if Path(path).is_absolute() else src.parent / path
        dest = out / f"{i:05d}_{label}.png"
        Image.open(p).convert("RGB").save(dest)
        lines.append(f"{dest} {label}")
    (out / "list.txt").write_text("\n".join(lines) + "\n")
    print(f"{len(lines)} images")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The reference for freqtag's image preprocessing: what torchvision's standard ImageNet
transforms give on a PIL image, `Resize(short)` (bilinear) then `CenterCrop(crop)`, written
out as bytes `[3, crop, crop]` (ToTensor divides them by 255).

torchvision itself is not in the test environment; its two formulas are reproduced here from
its source (torchvision.transforms.functional): the long side is `int(short * long / s)`, and
the crop starts at `int(round((size - crop) / 2.0))`, Python's rounding, after padding an image
smaller than the crop with zeros, `(crop - size) // 2` before it. The resampling is Pillow's
own `Image.resize(..., BILINEAR)`, the component torchvision calls (the test venv pins Pillow
13.0).

With a second output file, the same again as Pillow 12 and earlier resize: always the
horizontal pass first, done here as two one-axis resizes (Pillow 13 runs the vertical pass
first for some shapes; each one-axis resize is one pass into bytes in either version).

    python torchvision_preprocess.py IMAGE SHORT CROP OUT [OUT_PILLOW12]
"""

import sys

from PIL import Image, ImageOps, __version__


def main() -> int:
    if int(__version__.split(".")[0]) < 13:
        print(
            f"torchvision_preprocess.py: Pillow {__version__}; the reference is Pillow 13 "
            "(tests/requirements.txt pins 13.0.0; scripts/test.sh installs it)",
            file=sys.stderr,
        )
        return 2
    path, short, crop, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    img = Image.open(path).convert("RGB")
    w, h = img.size
    s, l = (w, h) if w <= h else (h, w)
    new_s, new_l = short, int(short * l / s)
    size = (new_s, new_l) if w <= h else (new_l, new_s)
    if size != img.size:
        resized = img.resize(size, Image.BILINEAR)
    else:
        resized = img
    write(resized, crop, out)
    if len(sys.argv) > 5:
        if size[0] != w:
            img = img.resize((size[0], h), Image.BILINEAR)
        if size[1] != h:
            img = img.resize(size, Image.BILINEAR)
        write(img, crop, sys.argv[5])
    return 0


def write(img: Image.Image, crop: int, out: str) -> None:
    """`CenterCrop(crop)` of the resized image, its planes as bytes."""
    w, h = img.size
    if w < crop or h < crop:
        pad = (
            (crop - w) // 2 if crop > w else 0,
            (crop - h) // 2 if crop > h else 0,
            (crop - w + 1) // 2 if crop > w else 0,
            (crop - h + 1) // 2 if crop > h else 0,
        )
        img = ImageOps.expand(img, border=pad, fill=0)
        w, h = img.size
    top, left = int(round((h - crop) / 2.0)), int(round((w - crop) / 2.0))
    img = img.crop((left, top, left + crop, top + crop))
    planes = img.split()
    with open(out, "wb") as f:
        for p in planes:
            f.write(p.tobytes())


if __name__ == "__main__":
    sys.exit(main())

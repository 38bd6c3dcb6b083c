"""The reference for freqtag's image preprocessing: what torchvision's standard ImageNet
transforms give on a PIL image, `Resize(short)` (bilinear) then `CenterCrop(crop)`, written
out as bytes `[3, crop, crop]` (ToTensor divides them by 255).

torchvision itself is not in the test environment; its two formulas are reproduced here from
its source (torchvision.transforms.functional): the long side is `int(short * long / s)`, and
the crop starts at `int(round((size - crop) / 2.0))`, Python's rounding, after padding an image
smaller than the crop with zeros, `(crop - size) // 2` before it. The resampling is Pillow's
own `Image.resize(..., BILINEAR)`, the component torchvision calls (the test venv pins Pillow
12.3; 13.0 orders its two passes differently for some shapes, README "Inputs").

    python torchvision_preprocess.py IMAGE SHORT CROP OUT
"""

import sys

from PIL import Image, ImageOps


def main() -> int:
    path, short, crop, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    img = Image.open(path).convert("RGB")
    w, h = img.size
    s, l = (w, h) if w <= h else (h, w)
    new_s, new_l = short, int(short * l / s)
    size = (new_s, new_l) if w <= h else (new_l, new_s)
    if size != img.size:
        img = img.resize(size, Image.BILINEAR)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())

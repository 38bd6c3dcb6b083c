"""Writes a corpus of awkward and broken image inputs for tests/it/bad_input.rs, each named
after what it is. Awkward-but-valid ones (grey, RGBA, palette, 16-bit, CMYK, 1x1) must be
processed; broken ones must be skipped with a reason; expected.json says which is which.

usage: python make_bad_inputs.py GOOD_PNG OUT_DIR
"""
import json
import os
import struct
import sys
import zlib

from PIL import Image

good, out = sys.argv[1], sys.argv[2]
os.makedirs(out, exist_ok=True)
src = Image.open(good).convert("RGB")
ok, bad = [], []


def save(name, img, **kw):
    img.save(f"{out}/{name}", **kw)
    ok.append(name)


save("grey.png", src.convert("L"))
save("rgba.png", src.convert("RGBA"))
save("palette.png", src.convert("P", palette=Image.ADAPTIVE, colors=16))
save("deep16.png", src.convert("I;16"))
save("cmyk.jpg", src.convert("CMYK"), quality=95)
save("tiny1x1.png", src.resize((1, 1)))
save("progressive.jpg", src, quality=90, progressive=True)

png = open(good, "rb").read()
jpg_buf = f"{out}/progressive.jpg"
jpg = open(jpg_buf, "rb").read()


def write(name, data):
    open(f"{out}/{name}", "wb").write(data)
    bad.append(name)


write("truncated.png", png[: len(png) // 2])
corrupt = bytearray(png)
corrupt[60:80] = b"\x00" * 20  # inside IDAT: zlib data and CRC no longer match
write("corrupt-crc.png", bytes(corrupt))
write("truncated.jpg", jpg[: len(jpg) // 2])
write("garbage.jpg", b"\xff\xd8\xff\xe0" + os.urandom(2000))
write("empty.png", b"")
write("text.jpg", b"this is a text file, not a JPEG\n")


def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


# decode bomb: a valid header claiming 20000 x 20000 RGB pixels, a tiny stream behind it
ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 100)) + chunk(b"IEND", b"")
write("bomb-20000x20000.png", bomb)
os.symlink(f"{out}/does-not-exist.png", f"{out}/broken-link.png")
bad.append("broken-link.png")

json.dump({"processed": sorted(ok), "skipped": sorted(bad)}, open(f"{out}/expected.json", "w"))
print(f"make_bad_inputs: {len(ok)} awkward but valid, {len(bad)} broken in {out}")

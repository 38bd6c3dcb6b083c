"""What cuDNN itself reaches on ResNet-32's convolutions, through PyTorch, on the GPU machine.

Run by scripts/gpu-check.sh (never part of the tests). For each of ResNet-32's convolution shapes
at the batch freqtag's GPU passes use (4 096 frames of 32x32), it times one convolution in f32
without TF32 (as freqtag computes) in NCHW and in channels-last (NHWC) layout, with cuDNN's
heuristic choice and with its benchmarked best choice, and in f16; it prints milliseconds per
convolution and TFLOP/s, so freqtag's figures can be set against what the library can do.
"""

import json
import sys
import time

import torch

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

BATCH = int(sys.argv[1]) if len(sys.argv) > 1 else 4096
# (cin, cout, side, stride, count in ResNet-32)
SHAPES = [(3, 16, 32, 1, 1), (16, 16, 32, 1, 10), (16, 32, 32, 2, 1), (32, 32, 16, 1, 9),
          (32, 64, 16, 2, 1), (64, 64, 8, 1, 9)]


def timed(f, reps=20):
    f()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        f()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps


rows = []
total = {}
for cin, cout, side, stride, count in SHAPES:
    for dtype in (torch.float32, torch.float16):
        for layout in ("nchw", "nhwc"):
            for bench in (False, True):
                torch.backends.cudnn.benchmark = bench
                x = torch.randn(BATCH, cin, side, side, device="cuda", dtype=dtype)
                w = torch.randn(cout, cin, 3, 3, device="cuda", dtype=dtype)
                if layout == "nhwc":
                    x = x.to(memory_format=torch.channels_last)
                    w = w.to(memory_format=torch.channels_last)
                s = timed(lambda: torch.nn.functional.conv2d(x, w, stride=stride, padding=1))
                out = side // stride
                flop = 2 * BATCH * out * out * cout * cin * 9
                key = f"{str(dtype)[6:]} {layout} {'benchmark' if bench else 'heuristic'}"
                total[key] = total.get(key, 0.0) + s * count
                rows.append({"cin": cin, "cout": cout, "side": side, "stride": stride,
                             "dtype": str(dtype)[6:], "layout": layout, "benchmark": bench,
                             "ms": round(s * 1e3, 4), "tflops": round(flop / s / 1e12, 2)})
                print(json.dumps(rows[-1]), flush=True)
print("ResNet-32's 31 convolutions at", BATCH, "frames, ms per pass (per image at 49 frames):")
for key, s in total.items():
    print(f"  {key:28s} {s * 1e3:8.2f} ms  ({s * 1e3 * 49 / BATCH:.3f} ms per image)")

"""Checks the frequency-tagging signature of a paper-pipeline run (halves at 6 and 7.5 Hz, 240
frames at 120 fps, so 0.5 Hz bins and a response lattice of every third bin):
- every conv1 neuron that responds has its two largest non-DC peaks at 6 Hz (bin 12) and 7.5 Hz
  (bin 15);
- in every layer, bins off the lattice (k not a multiple of 3) are zero up to float rounding.

usage: python check_tagging.py OUT_DIR
"""
import sys

import numpy as np
import pandas as pd

spec = pd.read_parquet(sys.argv[1] + "/spectra")
amp = np.stack(spec.amplitude.to_numpy())
assert amp.shape[1] == 121, amp.shape
peak = amp[:, 1:].max(axis=1)
live = peak > 1e-6
off = np.array([k % 3 != 0 for k in range(121)])
ratio = amp[live][:, off].max(axis=1) / peak[live]
worst = ratio.max()
if worst > 1e-5:
    i = np.argmax(ratio)
    row = spec[live].iloc[i]
    sys.exit(f"off-lattice bin at {worst:.2e} of the peak in {row.layer} channel {row.channel} of {row.image_id}")
conv1 = (spec.layer == "conv1").to_numpy() & live
top2 = np.sort(np.argsort(amp[conv1][:, 1:], axis=1)[:, -2:] + 1, axis=1)
bad = (top2 != np.array([12, 15])).any(axis=1)
if bad.any():
    sys.exit(f"{bad.sum()} conv1 neurons have their largest non-DC peaks elsewhere: {top2[bad][:5]}")
print(f"check_tagging: ok ({conv1.sum()} conv1 neurons peak at 6 and 7.5 Hz; off-lattice bins <= {worst:.1e} of the peak)")

"""Rewrites a legacy (pre-1.6) PyTorch checkpoint in the zip format torch.save has used since 1.6,
without torch: `archive/data.pkl` (tensors as persistent ids `('storage', FloatStorage, key,
'cpu', numel)` rebuilt by `torch._utils._rebuild_tensor_v2`), `archive/data/<key>` raw
little-endian storages, `archive/version`. The state dict is nested as `{"state_dict": ...}`
with `module.` prefixes kept, as the original. Reading uses the reference's own legacy reader.

usage: python to_torch_zip.py LEGACY.th OUT.pth
"""
import collections
import io
import pickle
import sys
import types
import zipfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "reference"))
from ref_paper import load_legacy_checkpoint  # noqa: E402

src, dst = sys.argv[1], sys.argv[2]
state = load_legacy_checkpoint(src)["state_dict"]

# stand-ins with torch's names, so pickle writes the globals torch itself would write
torch = types.ModuleType("torch")
utils = types.ModuleType("torch._utils")


def _rebuild_tensor_v2(*args):
    raise RuntimeError("only for pickling")


_rebuild_tensor_v2.__module__ = "torch._utils"
utils._rebuild_tensor_v2 = _rebuild_tensor_v2
FloatStorage = type("FloatStorage", (), {"__module__": "torch"})
torch.FloatStorage = FloatStorage
sys.modules["torch"], sys.modules["torch._utils"] = torch, utils


class Storage:
    def __init__(self, key, numel):
        self.key, self.numel = key, numel


class Tensor:
    def __init__(self, array, key):
        self.array, self.key = np.ascontiguousarray(array, dtype="<f4"), key

    def __reduce__(self):
        a = self.array
        stride = tuple(s // a.itemsize for s in a.strides)
        return (_rebuild_tensor_v2,
                (Storage(self.key, a.size), 0, a.shape, stride, False, collections.OrderedDict()))


class Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            return ("storage", FloatStorage, obj.key, "cpu", obj.numel)
        return None


tensors = collections.OrderedDict(
    (name, Tensor(np.asarray(v), str(i))) for i, (name, v) in enumerate(state.items()))
buf = io.BytesIO()
Pickler(buf, protocol=2).dump({"state_dict": tensors, "best_prec1": 92.78})
with zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as z:
    z.writestr("archive/data.pkl", buf.getvalue())
    for t in tensors.values():
        z.writestr(f"archive/data/{t.key}", t.array.tobytes())
    z.writestr("archive/version", "3\n")
print(f"to_torch_zip: {len(tensors)} tensors written to {dst}")

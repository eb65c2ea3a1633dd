"""Checkpoints of the harness: crash-safe writes, random states, and loading with checks.

Every file is written to ``<path>.partial`` (a name that does not end in ``.pt``), flushed to
disk and renamed into place (``os.replace`` is atomic on POSIX and Windows), so a process
killed at any moment leaves either the previous complete file or the new complete file. A
write that fails (a full disk) removes its partial file and keeps the previous checkpoint.
"""

from __future__ import annotations

import json
import os
import random
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from .config import DistillError, differences

__all__ = ["atomic_write", "save", "save_json", "load", "load_checkpoint", "rng_state", "set_rng_state"]


def _fsync_dir(d: str) -> None:
    try:
        fd = os.open(d or ".", os.O_RDONLY)
    except OSError:
        return  # not possible on every platform (Windows); the rename itself is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str, write: Callable) -> None:
    """``write(f)`` into ``path + '.partial'``, then rename it over ``path``."""
    d = os.path.dirname(path)
    if d:
        os.makedirs(d, exist_ok=True)
    tmp = path + ".partial"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        kept = "; the previous version is kept" if os.path.exists(path) else ""
        raise DistillError(f"cannot write {path!r}: {type(e).__name__}: {e.strerror or e}{kept}") from None
    _fsync_dir(d)


def save(obj, path: str) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def save_json(obj, path: str) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


def load(path: str, what: str) -> Dict:
    """A checkpoint written by ``save`` (tensors and plain Python values only: weights_only)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DistillError(f"{what} {path!r} does not exist") from None
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise DistillError(f"{what} {path!r} is corrupt ({type(e).__name__}: {first}); nothing was changed: "
                           f"delete it to train that run from its start, or restore it") from None
    if not isinstance(obj, dict) or "model" not in obj:
        raise DistillError(f"{what} {path!r} is not a checkpoint of this harness")
    return obj


def check_fingerprint(obj: Dict, want: Dict, path: str) -> None:
    diff = differences(obj.get("fingerprint") or {}, want)
    if diff:
        raise DistillError(f"checkpoint {path!r} was written by a run with other arguments ({'; '.join(diff)}); "
                           "resume with that run's arguments, or choose another --out")


# ----------------------------------------------------------------------------- random states


def rng_state(loader_generator: torch.Generator) -> Dict:
    """Every random state the rest of a run depends on: torch (CPU and CUDA), NumPy, Python and
    the data order (the training loader's generator, which draws each epoch's permutation)."""
    st = {"torch": torch.get_rng_state(), "python": random.getstate(), "loader": loader_generator.get_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
    except ImportError:
        return st
    name, keys, pos, has_gauss, cached = np.random.get_state()
    st["numpy"] = (name, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(cached))
    return st


def set_rng_state(st: Dict, loader_generator: torch.Generator) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    loader_generator.set_state(st["loader"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])
    if "numpy" in st:
        import numpy as np

        name, keys, pos, has_gauss, cached = st["numpy"]
        np.random.set_state((name, keys.numpy().astype("uint32"), pos, has_gauss, cached))


# ----------------------------------------------------------------------------- model files


def load_checkpoint(model: nn.Module, path: str, role: str = "teacher") -> None:
    """Load a state dict saved raw or under 'model' / 'state_dict' / 'net' (a 'module.' prefix is dropped).
    ``role`` names the model in error messages ("teacher checkpoint ..."; rk.compare loads students too)."""
    if not os.path.isfile(path):
        raise DistillError(f"{role} checkpoint {path!r} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise DistillError(f"cannot read {role} checkpoint {path!r}: {type(e).__name__}: {first}") from None
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "net"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise DistillError(f"{role} checkpoint {path!r} does not hold a state dict")
    sd = {k[7:] if k.startswith("module.") else k: v for k, v in obj.items()}
    own = model.state_dict()
    fc = next((k for k in ("fc.weight",) if k in own and k in sd), None)
    if fc and sd[fc].shape[0] != own[fc].shape[0]:
        raise DistillError(f"{role} checkpoint {path!r} has {sd[fc].shape[0]} classes but the data set has {own[fc].shape[0]}")
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [k for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        what = "; ".join(f"{n}: {', '.join(v[:3])}{'...' if len(v) > 3 else ''}" for n, v in
                         (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong)) if v)
        raise DistillError(f"{role} checkpoint {path!r} does not fit the {type(model).__name__} {role} ({what})")
    model.load_state_dict(sd)


def leftovers(d: str) -> List[str]:
    """Partial files a killed write left in ``d`` (never loaded; removed when the run resumes)."""
    if not os.path.isdir(d):
        return []
    return [os.path.join(d, f) for f in os.listdir(d) if f.endswith(".partial")]


def read_json(path: str, what: str) -> Optional[Dict]:
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise DistillError(f"{what} {path!r} cannot be read ({type(e).__name__}: {e}); nothing was changed") from None

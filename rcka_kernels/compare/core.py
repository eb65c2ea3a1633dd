"""``rk.compare``: layer-by-layer CKA of two networks over a data set.

    res = rk.compare(teacher, student, loader)           # every default layer pair
    res.values                                           # (len(res.layers_a), len(res.layers_b)) float64
    res.plot("cka.png"); res.save("cka.json")

Estimators (``estimator=``):
  "exact"      the CKA of the whole data set: equal to
               ``rk.cka(cat(features of layer i), cat(features of layer j), debiased=...)``
               whatever the batch size, from streamed statistics whose size does not
               depend on the number of samples (linear kernel only; per-batch products in
               the features' dtype or ``product_dtype``, summed in float64): 8 bytes x
               (P_A P_B + sum p_i^2 + sum q_j^2) where P = sum of the layers' widths
               (see ``stats.exact_bytes``).
  "minibatch"  Nguyen et al. (2021): the unbiased HSIC of every pair on each batch,
               summed over batches, then CKA. Depends on the batch size; any kernel;
               batches of fewer than 4 samples are skipped with a warning. ``debiased``
               does not apply (the per-batch HSIC is always the unbiased one).
  "auto"       the exact estimator where it costs no more than the minibatch one, else
               minibatch (the RBF kernel: always minibatch). On the first batch (b rows):
               1. memory: the widest layers (of either model) move to minibatch until the
                  exact statistics fit ``memory_budget`` (default 1 GiB);
               2. time: the remaining layers keep the exact estimator if its products cost
                  no more multiply-adds per sample than the minibatch estimator's on batches
                  of b, or at most ``AUTO_SMALL_MADDS`` (65,536: one 256 x 256 pair, less
                  time than the ops around it); otherwise every pair is minibatch.
               ``res.estimators[i][j]`` says what each pair used, ``res.estimator`` is
               "exact", "minibatch" or "mixed", ``res.meta["auto"]`` the two costs.
               ``estimator="exact"`` gives the data set's CKA whatever it costs.

Cost (linear kernel; n samples in batches of b; layers of widths p_i (A) and q_j (B),
P_A = sum p_i, P_B = sum q_j; the forward passes come on top of either; exactly:
``ExactStats.madds`` and ``MinibatchStats.madds``, which count what the updates run):
  exact      n (P_A P_B + 3/4 sum p_i^2 + 3/4 sum q_j^2) multiply-adds in float32 GEMMs
             (about half of P_A^2 when A and B are the same layers of one model), and the
             float64 statistics above;
  minibatch  about n b (P_A + P_B + L_A L_B) multiply-adds (each layer's b x b Gram per batch,
             3/4 of it from b = 512 on; every pair's <K, L>), and 4 b^2 (L_A + L_B) bytes of
             Grams besides one batch's features.
So the exact estimator is the cheaper one for narrow or few layers or large batches, and
costs more (by construction, against any minibatch estimator, ours or a peer's) for many
wide layers on small batches. On benchmarks/bench_compare.py's case (two MLPs, 12 layers of
width 256 and 10 of width 192, n = 10,000, b = 256) it would be 6.8 M multiply-adds per
sample against 1.3 M, and 54 MiB of float64 statistics against pytorch-cka's 14 MiB of
working memory, so "auto" takes the minibatch estimator there: Nguyen et al.'s, as
pytorch-cka computes it, but on centred features and summed in float64
(benchmarks/results/compare_cpu.md: 0.58 s and 8.4 MiB of working memory against
pytorch-cka's 0.59 s and 13.9 MiB); the exact one, asked for, took 1.78 s, and its value
is the data set's, where the minibatch ones move with the batch size (by up to 0.008 there).

Values are never clamped. A layer whose features do not vary (or, debiased, whose
self-HSIC is not positive) gives CKA 0 with a warning that names it, as ``rk.cka``.
"""

from __future__ import annotations

import datetime
import json
import math
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Union

import torch
from torch import nn

from .. import _validate
from ..distributed import is_distributed
from .stats import ExactStats, MinibatchStats, exact_bytes, work_dtype

__all__ = ["compare", "CompareResult", "default_layers", "INPUT_KEYS", "DEFAULT_MEMORY_BUDGET"]

Tensor = torch.Tensor

#: dict batches: the first of these keys present is the model input
INPUT_KEYS = ("input", "inputs", "x", "image", "images", "pixel_values", "input_ids")
#: bytes of exact statistics that estimator="auto" allows before moving layers to minibatch
DEFAULT_MEMORY_BUDGET = 1 << 30
ESTIMATORS = ("auto", "exact", "minibatch")
#: multiply-adds per sample up to which "auto" keeps the exact estimator whatever the minibatch
#: one would cost (one 256 x 256 layer pair): products this small take less time than the ops
#: around them
AUTO_SMALL_MADDS = 1 << 16
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


# ----------------------------------------------------------------------------- layers


def _unwrap(model: nn.Module) -> nn.Module:
    while isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module
    return model


def default_layers(model: nn.Module) -> List[str]:
    """The model's children in registration order, containers (``nn.Sequential``,
    ``nn.ModuleList``, ``nn.ModuleDict``) expanded recursively: for the harness's
    MLPs ``body.0 .. body.k, fc``; for its ResNets ``conv1, bn1, relu, layer1.0, ...,
    avgpool, fc`` (one entry per block)."""
    out: List[str] = []

    def walk(mod: nn.Module, prefix: str):
        for name, child in mod.named_children():
            full = f"{prefix}{name}"
            if isinstance(child, _CONTAINERS) and len(child):
                walk(child, full + ".")
            else:
                out.append(full)

    walk(_unwrap(model), "")
    return out


def _resolve_layers(model: nn.Module, layers, which: str) -> List[str]:
    names = dict(_unwrap(model).named_modules())
    if layers is None:
        layers = default_layers(model)
        if not layers:
            raise ValueError(f"compare: {which} has no sub-modules; name its layers with layers_{which[-1]}=")
        return layers
    if isinstance(layers, str):
        layers = [layers]
    layers = list(layers)
    if not layers:
        raise ValueError(f"compare: layers_{which[-1]} is empty")
    for name in layers:
        if not isinstance(name, str):
            raise TypeError(f"compare: layer names are strings as in named_modules(), got {name!r} in layers_{which[-1]}")
        if name == "" or name not in names:
            close = [k for k in names if k and (name in k or k in name)][:5]
            hint = f"; similar: {', '.join(close)}" if close else ""
            raise ValueError(f"compare: {which} has no layer {name!r} (names as in named_modules(){hint})")
    dup = sorted({n for n in layers if layers.count(n) > 1})
    if dup:
        raise ValueError(f"compare: layers_{which[-1]} names {', '.join(map(repr, dup))} more than once")
    return layers


def _as_features(name: str, out: Any) -> Tensor:
    """A layer output as (n, features): tuple/list -> first element, ``last_hidden_state`` -> it (repeatedly)."""
    for _ in range(8):
        if isinstance(out, (tuple, list)) and out:
            out = out[0]
        elif not isinstance(out, Tensor) and hasattr(out, "last_hidden_state"):
            out = out.last_hidden_state
        else:
            break
    if not isinstance(out, Tensor):
        raise TypeError(f"compare: layer {name!r} returned {type(out).__name__}, not a tensor (or a tuple / an object with "
                        "last_hidden_state holding one)")
    if out.ndim == 0:
        raise ValueError(f"compare: layer {name!r} returned a scalar; a layer's output must have a batch dimension")
    if not out.is_floating_point():
        raise TypeError(f"compare: layer {name!r} returned {out.dtype} features; CKA needs floating-point features")
    return out.detach().reshape(out.shape[0], -1)


class _Recorder:
    """Forward hooks on the named layers: each output, as (n, features), goes to ``sink``
    when one is set, else is kept in ``feats`` until ``drain``."""

    def __init__(self, model: nn.Module, names: Sequence[str], tag: str):
        self.tag = tag
        self.names = list(names)
        self.sink: Optional[Callable[[str, Tensor], None]] = None
        self.feats: Dict[str, Tensor] = {}
        self.calls: Dict[str, int] = {}
        mods = dict(model.named_modules())
        self.handles = [mods[n].register_forward_hook(self._hook(n)) for n in self.names]

    def _hook(self, name):
        def hook(module, inputs, output):
            calls = self.calls[name] = self.calls.get(name, 0) + 1
            if calls > 1:
                raise ValueError(f"compare: layer {self.tag}{name!r} ran {calls} times in one forward pass, so its output is "
                                 "ambiguous (a module reused inside the model); name a layer that runs once")
            f = _as_features(f"{self.tag}{name}", output)
            if self.sink is None:
                self.feats[name] = f
            else:
                self.sink(name, f)
        return hook

    def done(self) -> None:
        """After a forward pass: every named layer ran; reset for the next one."""
        missing = [n for n in self.names if n not in self.calls]
        self.calls = {}
        if missing:
            self.feats = {}
            raise ValueError(f"compare: layer {self.tag}{missing[0]!r} did not run in the forward pass")

    def drain(self):
        """(name, features) of the kept outputs, each let go once handed out."""
        for n in self.names:
            yield n, self.feats.pop(n)

    def remove(self):
        for h in self.handles:
            h.remove()


class _Feeder:
    """Hands each layer's features to the statistics as the forward pass produces them, so
    that a batch's features are not all alive at once (only the Grams, or the packed rows of
    the exact estimator, are), after checking that every layer has the batch's rows and its
    first-batch width. ``routes[(model, name)]``: the (side, index, label) the output of
    ``name`` in model 0 (A) or 1 (B) stands for (a layer of a model compared with itself can
    be on both sides)."""

    def __init__(self, routes, widths, exact: Optional[ExactStats], exact_index, mini: Optional[MinibatchStats]):
        # per (model, name): (side, index, label, width, exact's index or None), looked up once per layer and batch
        self.routes = {key: [(side, i, label, widths[side][i], exact_index[side][i]) for side, i, label in r]
                       for key, r in routes.items()}
        self.exact, self.mini = exact, mini
        self.batch_no, self.rows, self.first = 0, None, None

    def begin(self, batch_no: int) -> None:
        self.batch_no, self.rows = batch_no, None

    def __call__(self, model: int, name: str, f: Tensor) -> None:
        rows, width = f.shape
        for side, i, label, w, j in self.routes[(model, name)]:
            if rows != self.rows:
                if self.rows is not None:
                    raise ValueError(f"compare: batch {self.batch_no}: layer {label!r} has {rows} rows but {self.first!r} has "
                                     f"{self.rows}; every layer's output must lead with the batch dimension")
                self.rows, self.first = rows, label
            if width != w:
                raise ValueError(f"compare: batch {self.batch_no}: layer {label!r} has {width} features, {w} in the first "
                                 "batch; the widths must not change")
            if self.mini is not None:
                self.mini.feed(side, i, f)
            if j is not None:
                self.exact.feed(side, j, f)

    def end(self) -> Optional[Tensor]:
        """Add the batch to the statistics: a 0-dim probe, finite iff every feature was (or None)."""
        probes = [p for p in (self.exact.end_batch() if self.exact is not None else None,
                              self.mini.end_batch() if self.mini is not None else None) if p is not None]
        return sum(probes) if probes else None


def _batch_input(batch: Any, inputs: Optional[Callable]) -> Any:
    if inputs is not None:
        return inputs(batch)
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError("compare: the loader gave an empty tuple/list batch")
        return batch[0]
    if isinstance(batch, dict):
        for k in INPUT_KEYS:
            if k in batch:
                return batch[k]
        raise ValueError(f"compare: a dict batch needs one of the keys {', '.join(INPUT_KEYS)} (or pass inputs=callable); "
                         f"it has {', '.join(map(str, batch))}")
    raise TypeError(f"compare: a batch must be a tensor, a tuple/list whose first element is the input, or a dict; "
                    f"got {type(batch).__name__} (or pass inputs=callable)")


def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_to(v, device) for v in x)
    return x


def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _raise_nonfinite(names: List[str], feats: List[Tensor], batch_no: int) -> None:
    """The statistics saw NaN or Inf: name the layers (the slow path, only on failure)."""
    bad = [name for name, f in zip(names, feats) if not bool(torch.isfinite(f).all())]
    if not bad:  # finite features whose products overflowed the work dtype
        raise ValueError(f"compare: batch {batch_no}: the features overflow the product dtype; pass product_dtype=torch.float64")
    raise ValueError(f"compare: batch {batch_no}: layer {bad[0]!r} has NaN or Inf features"
                     + (f" (also {', '.join(map(repr, bad[1:4]))})" if len(bad) > 1 else ""))


# ----------------------------------------------------------------------------- result


def _parse_bytes(v: Union[int, float, str]) -> int:
    if isinstance(v, str):
        s = v.strip().lower().replace(" ", "").rstrip("b")
        mult = {"k": 1 << 10, "ki": 1 << 10, "m": 1 << 20, "mi": 1 << 20, "g": 1 << 30, "gi": 1 << 30}
        for suf in sorted(mult, key=len, reverse=True):
            if s.endswith(suf):
                return int(float(s[: -len(suf)]) * mult[suf])
        return int(float(s))
    return int(v)


@dataclass
class CompareResult:
    """Layer-by-layer CKA of two networks: ``values[i, j]`` is the CKA of
    ``layers_a[i]`` and ``layers_b[j]`` over ``n_samples`` samples."""

    values: Tensor
    layers_a: List[str]
    layers_b: List[str]
    estimators: List[List[str]]
    n_samples: int
    kernel: str = "linear"
    sigma: Any = None
    debiased: bool = False
    model_a: str = "model_a"
    model_b: str = "model_b"
    widths_a: List[int] = field(default_factory=list)
    widths_b: List[int] = field(default_factory=list)
    batches: int = 0
    skipped_batches: int = 0
    meta: Dict[str, Any] = field(default_factory=dict)

    @property
    def estimator(self) -> str:
        """"exact", "minibatch" or "mixed" (then ``estimators`` says which pair used which)."""
        kinds = {e for row in self.estimators for e in row}
        return kinds.pop() if len(kinds) == 1 else "mixed"

    def __getitem__(self, key):
        """``res["layer_a", "layer_b"]`` -> the CKA of that pair (a float)."""
        a, b = key
        return float(self.values[self.layers_a.index(a), self.layers_b.index(b)])

    def table(self, digits: int = 3) -> str:
        """The matrix as a markdown table (rows: layers_a, columns: layers_b)."""
        head = f"| {self.model_a} \\ {self.model_b} | " + " | ".join(self.layers_b) + " |"
        lines = [head, "|" + "---|" * (len(self.layers_b) + 1)]
        for i, a in enumerate(self.layers_a):
            cells = [f"{v:.{digits}f}" + ("" if self.estimators[i][j] == "exact" else "*") for j, v in enumerate(self.values[i].tolist())]
            lines.append(f"| {a} | " + " | ".join(cells) + " |")
        if self.estimator == "mixed":
            lines.append("\n\\* minibatch estimator (the other pairs: exact)")
        return "\n".join(lines)

    def __str__(self) -> str:
        return (f"CompareResult({self.model_a} vs {self.model_b}, {self.kernel} CKA, {self.estimator}, "
                f"{'debiased, ' if self.debiased else ''}n={self.n_samples})\n{self.table()}")

    def title(self) -> str:
        est = self.estimator if self.estimator != "minibatch" else f"minibatch ({self.batches} batches)"
        return f"{self.model_a} vs {self.model_b}: {'debiased ' if self.debiased else ''}{self.kernel} CKA, {est}, n={self.n_samples}"

    def plot(self, path=None, *, ax=None, title: Optional[str] = None, annotate: Optional[bool] = None, cmap: str = "magma",
             vmin: Optional[float] = None, vmax: Optional[float] = None, colorbar: bool = True):
        """Heatmap of ``values`` (rows: model A's layers, bottom to top; columns: model B's).

        Returns the matplotlib ``Figure`` (of ``ax`` when given); writes a PNG when
        ``path`` is given. Pairs computed by the minibatch estimator in a mixed
        result are hatched. ``annotate`` (default: up to 16 x 16 cells) prints the values.
        """
        from matplotlib.figure import Figure

        v = self.values.double().numpy()
        fig = None
        if ax is None:
            la, lb = len(self.layers_a), len(self.layers_b)
            fig = Figure(figsize=(min(3 + 0.55 * lb, 16), min(2.5 + 0.45 * la, 14)))
            ax = fig.add_subplot()
        else:
            fig = ax.figure
        lo = min(0.0, float(v.min())) if vmin is None else vmin
        hi = max(1.0, float(v.max())) if vmax is None else vmax
        im = ax.imshow(v, origin="lower", cmap=cmap, vmin=lo, vmax=hi, aspect="auto", interpolation="nearest")
        ax.set_xticks(range(len(self.layers_b)), self.layers_b, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(len(self.layers_a)), self.layers_a, fontsize=8)
        ax.set_xlabel(f"{self.model_b} layers")
        ax.set_ylabel(f"{self.model_a} layers")
        ax.set_title(self.title() if title is None else title, fontsize=9)
        if annotate is None:
            annotate = v.shape[0] <= 16 and v.shape[1] <= 16
        if annotate:
            for i in range(v.shape[0]):
                for j in range(v.shape[1]):
                    frac = (v[i, j] - lo) / (hi - lo) if hi > lo else 0.0
                    ax.text(j, i, f"{v[i, j]:.2f}", ha="center", va="center", fontsize=7, color="black" if frac > 0.6 else "white")
        if self.estimator == "mixed":
            for i, row in enumerate(self.estimators):
                for j, e in enumerate(row):
                    if e == "minibatch":
                        ax.add_patch(_rect(j, i))
        if colorbar:
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="CKA")
        if path is not None:
            fig.tight_layout()
            fig.savefig(path, dpi=120)
        return fig

    # ------------------------------------------------------------------ persistence

    def to_dict(self) -> Dict[str, Any]:
        sigma = self.sigma if self.sigma is None or isinstance(self.sigma, (str, int, float)) else str(self.sigma)
        return {
            "format": "rcka_kernels.compare/1",
            "model_a": self.model_a, "model_b": self.model_b,
            "layers_a": list(self.layers_a), "layers_b": list(self.layers_b),
            "widths_a": list(self.widths_a), "widths_b": list(self.widths_b),
            "values": self.values.double().tolist(),
            "estimator": self.estimator, "estimators": [list(r) for r in self.estimators],
            "n_samples": self.n_samples, "batches": self.batches, "skipped_batches": self.skipped_batches,
            "kernel": self.kernel, "sigma": sigma, "debiased": self.debiased,
            "meta": self.meta,
        }

    def save(self, path) -> None:
        """JSON with the values, the layer names and the settings (``load`` reads it back)."""
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1, allow_nan=False)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "CompareResult":
        try:
            values = torch.tensor(d["values"], dtype=torch.float64).reshape(len(d["layers_a"]), len(d["layers_b"]))
            return cls(values=values, layers_a=list(d["layers_a"]), layers_b=list(d["layers_b"]),
                       estimators=[list(r) for r in d["estimators"]], n_samples=int(d["n_samples"]),
                       kernel=d.get("kernel", "linear"), sigma=d.get("sigma"), debiased=bool(d.get("debiased", False)),
                       model_a=d.get("model_a", "model_a"), model_b=d.get("model_b", "model_b"),
                       widths_a=list(d.get("widths_a", [])), widths_b=list(d.get("widths_b", [])),
                       batches=int(d.get("batches", 0)), skipped_batches=int(d.get("skipped_batches", 0)), meta=d.get("meta", {}))
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"not a compare result: {type(e).__name__}: {e}") from None

    @classmethod
    def load(cls, path) -> "CompareResult":
        with open(path) as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not JSON ({e})") from None
        if not isinstance(d, dict) or d.get("format", "").split("/")[0] != "rcka_kernels.compare":
            raise ValueError(f"{path}: not a saved rcka_kernels compare result")
        return cls.from_dict(d)


def _rect(j, i):
    from matplotlib.patches import Rectangle

    return Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="///", edgecolor="gray", linewidth=0)


# ----------------------------------------------------------------------------- compare


def _choose_exact(widths_a, widths_b, debiased, shared, budget):
    """Boolean masks (layers of A, of B) for the exact estimator: drop the widest
    layer (of either model) until the statistics fit ``budget`` bytes."""
    ea, eb = [True] * len(widths_a), [True] * len(widths_b)

    def size():
        wa = [w for w, e in zip(widths_a, ea) if e]
        wb = wa if shared else [w for w, e in zip(widths_b, eb) if e]
        return exact_bytes(wa, wb, debiased, shared) if wa and wb else 0

    while size() > budget:
        cand = [(w, 0, i) for i, (w, e) in enumerate(zip(widths_a, ea)) if e]
        if not shared:
            cand += [(w, 1, j) for j, (w, e) in enumerate(zip(widths_b, eb)) if e]
        _, side, k = max(cand)
        (ea if side == 0 else eb)[k] = False
        if shared:
            eb[k] = False
    if shared:
        eb = list(ea)
    return ea, eb


def _auto(widths_a, widths_b, b, debiased, shared, budget, itemsize):
    """estimator="auto": (masks of A's and B's layers for the exact estimator, what the choice
    was made on). The layers whose statistics fit ``budget`` (``_choose_exact``) keep it if
    its products cost no more multiply-adds per sample than the minibatch estimator's on
    batches of b (or at most ``AUTO_SMALL_MADDS``); otherwise every pair is minibatch."""
    ea, eb = _choose_exact(widths_a, widths_b, debiased, shared, budget)
    wa, wb = _pick(widths_a, ea), _pick(widths_b, eb)
    exact = ExactStats.madds(wa, wb, shared, itemsize) if wa and wb else 0
    mini = MinibatchStats.madds(widths_a, widths_b, b, shared) // b
    info = {"batch_size": b, "exact_madds_per_sample": exact, "minibatch_madds_per_sample": mini}
    if exact > max(mini, AUTO_SMALL_MADDS):
        ea, eb = [False] * len(widths_a), [False] * len(widths_b)
    return ea, eb, info


def _index(mask):
    """Position of each True entry among the True ones (None for the others)."""
    out, k = [], 0
    for m in mask:
        out.append(k if m else None)
        k += bool(m)
    return out


def _pick(xs, mask):
    return [x for x, m in zip(xs, mask) if m]


def _progress(loader, enabled: bool, desc: str):
    if not enabled:
        return loader, None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return loader, None
    try:
        total = len(loader)
    except TypeError:
        total = None
    bar = tqdm(loader, total=total, desc=desc, file=sys.stderr, leave=False)
    return bar, bar


def _finish(hxy, hxx, hyy, names_a, names_b, what, warn_names):
    """CKA from the HSIC terms; 0 (with a warning naming the layers) where a self term is not positive."""
    tiny = torch.finfo(torch.float64).tiny
    oka, okb = hxx > tiny, hyy > tiny
    for ok, names in ((oka, names_a), (okb, names_b)):
        bad = [n for n, v in zip(names, ok.tolist()) if not v]
        warn_names.extend(b for b in bad if b not in warn_names)
    ok = oka[:, None] & okb[None]
    denom = torch.sqrt(torch.where(ok, hxx[:, None] * hyy[None], torch.ones_like(hxy)))
    return torch.where(ok, hxy / denom, torch.zeros_like(hxy))


def compare(model_a: nn.Module, model_b: Optional[nn.Module], loader: Iterable, layers_a=None, layers_b=None, *,
            kernel: str = "linear", sigma=None, estimator: str = "auto", debiased: bool = False, device=None,
            progress: bool = True, memory_budget: Union[int, str] = DEFAULT_MEMORY_BUDGET,
            inputs: Optional[Callable[[Any], Any]] = None, max_batches: Optional[int] = None,
            product_dtype: Optional[torch.dtype] = None, group=None) -> CompareResult:
    """CKA of every layer of ``model_a`` with every layer of ``model_b`` over ``loader``.

    Args:
      model_a, model_b: ``nn.Module``s; ``model_b`` ``None`` or ``model_a`` itself compares the
        model with itself (one forward pass per batch). Both run in eval mode under
        ``torch.no_grad()`` and get their training flags back afterwards; with ``device``
        they are moved there (as ``.to(device)``).
      loader: any iterable of batches: a tensor, a tuple/list whose first element is the
        input, or a dict with one of ``INPUT_KEYS`` ("input", "inputs", "x", "image",
        "images", "pixel_values", "input_ids"); ``inputs=callable`` maps a batch to the
        model input instead. Inputs move to ``device`` (default: model_a's device).
      layers_a, layers_b: module names as in ``named_modules()``; ``None``: ``default_layers``
        (``layers_b`` defaults to ``layers_a`` when the models are the same). A layer's
        output is flattened to (n, -1); a tuple output gives its first element, an object
        with ``last_hidden_state`` that.
      kernel: "linear" or "rbf" (with ``sigma`` a float or "median"/"mean", per batch; RBF is
        minibatch only). estimator: "auto" | "exact" | "minibatch" (module docstring).
      debiased: the exact estimator with Song et al.'s unbiased HSIC (Kornblith's debiased CKA).
      memory_budget: bytes (or "512MiB") of exact statistics that "auto" allows.
      product_dtype: dtype of the per-batch products (the Grams, the cross products);
        default: the features' (float32 for float32/half/bfloat16 features, float64 for
        float64 ones). The sums over batches are float64 either way; ``torch.float64``
        costs about 1.5-2x the time on a CPU (much more on most GPUs) and buys the
        last digits (the exact estimator then equals the float64 CKA of the concatenated
        features to ~1e-12; with float32 products to ~1e-7 relative).
      max_batches: stop after this many batches. group: the torch.distributed process group:
        each rank feeds its shard; the statistics are all-reduced, every rank gets the result
        of the concatenated data (every rank needs at least one batch).
    Returns: ``CompareResult``.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"compare: estimator must be one of {ESTIMATORS}, got {estimator!r}")
    _validate.check_kernel("compare", kernel, sigma)
    if isinstance(sigma, Tensor):
        raise ValueError("compare: sigma must be a float or 'median'/'mean' here (one bandwidth per layer and batch)")
    if kernel != "linear" and estimator == "exact":
        raise ValueError("compare: the exact estimator needs the linear kernel (its statistics live in feature space); "
                         "use estimator='minibatch' with kernel='rbf'")
    budget = _parse_bytes(memory_budget)
    if product_dtype not in (None, torch.float32, torch.float64):
        raise ValueError(f"compare: product_dtype must be None, torch.float32 or torch.float64, got {product_dtype!r}")
    if not isinstance(model_a, nn.Module) or (model_b is not None and not isinstance(model_b, nn.Module)):
        raise TypeError("compare: model_a and model_b must be torch.nn.Module (model_b may be None)")
    same = model_b is None or _unwrap(model_b) is _unwrap(model_a)
    ma = _unwrap(model_a)
    mb = ma if same else _unwrap(model_b)
    names_a = _resolve_layers(ma, layers_a, "model_a")
    if layers_b is None and same:
        names_b = list(names_a)
    else:
        names_b = _resolve_layers(mb, layers_b, "model_b")
    shared = same and names_a == names_b
    dev = torch.device(device) if device is not None else _model_device(ma)
    if device is not None:
        ma.to(dev)
        mb.to(dev)
    modes = (ma.training, mb.training)
    rec_a = _Recorder(ma, list(dict.fromkeys(names_a + (names_b if same else []))), "")
    rec_b = None if same else _Recorder(mb, names_b, "model_b.")
    recs = [(0, rec_a)] + ([] if same else [(1, rec_b)])
    routes: Dict[Any, List[Any]] = {}
    for i, n in enumerate(names_a):
        routes.setdefault((0, n), []).append((0, i, n))
    if not shared:
        for j, n in enumerate(names_b):
            routes.setdefault((0 if same else 1, n), []).append((1, j, n if same else f"model_b.{n}"))

    def attach(fd: Optional[_Feeder]) -> None:
        """Outputs go to ``fd`` as they come (None: kept by the recorders)."""
        for m, rec in recs:
            rec.sink = None if fd is None else (lambda name, f, m=m: fd(m, name, f))

    def forward(x):
        ma(x)
        rec_a.done()
        if not same:
            mb(x)
            rec_b.done()

    rank0 = not is_distributed(group) or torch.distributed.get_rank(group) == 0
    it, bar = _progress(loader, progress and rank0, "compare")
    exact = mini = feeder = None
    ea = eb = None
    auto_info = None
    widths_a = widths_b = None
    batch_no = 0
    try:
        ma.eval()
        mb.eval()
        with torch.no_grad():
            for batch in it:
                if max_batches is not None and batch_no >= max_batches:
                    break
                x = _to(_batch_input(batch, inputs), dev)
                if feeder is not None:  # the statistics take each layer's output as it comes
                    feeder.begin(batch_no)
                forward(x)
                if feeder is None:  # the first batch: the outputs were kept until the widths are known
                    first = {(m, n): f for m, rec in recs for n, f in rec.feats.items()}
                    fa = [first[(0, n)] for n in names_a]
                    fb = [first[(0 if same else 1, n)] for n in names_b]
                    widths_a, widths_b = [f.shape[1] for f in fa], [f.shape[1] for f in fb]
                    wd = work_dtype(fa + fb, product_dtype)
                    if estimator == "exact":
                        ea, eb = [True] * len(names_a), [True] * len(names_b)
                    elif estimator == "auto" and kernel == "linear":
                        ea, eb, auto_info = _auto(widths_a, widths_b, fa[0].shape[0], debiased, shared, budget, wd.itemsize)
                    else:
                        ea, eb = [False] * len(names_a), [False] * len(names_b)
                    if any(ea) and any(eb):
                        exact = ExactStats(_pick(widths_a, ea), _pick(widths_b, eb), debiased=debiased, shared=shared, device=dev,
                                           product_dtype=wd)
                    if not (all(ea) and all(eb)):
                        mini = MinibatchStats(widths_a, widths_b, kernel=kernel, sigma=sigma, shared=shared, device=dev,
                                              product_dtype=wd)
                    exact_index = [_index(ea) if exact else [None] * len(ea), _index(eb) if exact else [None] * len(eb)]
                    feeder = _Feeder(routes, (widths_a, widths_b), exact, exact_index, mini)
                    feeder.begin(batch_no)
                    first = fa = fb = None
                    for m, rec in recs:
                        for n, f in rec.drain():
                            feeder(m, n, f)
                        f = None
                    attach(feeder)
                probe = feeder.end()
                if probe is not None and not math.isfinite(float(probe)):  # one host read per batch
                    attach(None)
                    forward(x)  # again, keeping the outputs, to name the layer (the slow path, only on failure)
                    labels = {key: r[0][2] for key, r in feeder.routes.items()}
                    kept = [(labels[(m, n)], f) for m, rec in recs for n, f in rec.feats.items()]
                    _raise_nonfinite([k for k, _ in kept], [f for _, f in kept], batch_no)
                x = None
                batch_no += 1
    finally:
        rec_a.remove()
        if rec_b is not None:
            rec_b.remove()
        ma.train(modes[0])
        mb.train(modes[1])
        if bar is not None:
            bar.close()
    dist_on = is_distributed(group)
    if dist_on:  # every rank must have run (shapes of the statistics are set by the first batch), with the same estimators
        code = 0.0 if ea is None else float(sum(ea) + sum(eb))  # layers on the exact estimator
        flags = torch.tensor([0.0 if widths_a is None else 1.0, code, -code], device=dev)
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MIN, group=group)
        ran, lo, hi = flags.tolist()
        if ran == 0.0:
            raise ValueError("compare: a rank's loader yielded no batches; under torch.distributed every rank needs at least one")
        if lo != -hi:
            raise ValueError("compare: estimator='auto' chose differently on different ranks (it weighs the exact estimator's "
                             "cost against the minibatch one's on each rank's first batch, and their sizes differ); pass "
                             "estimator='exact' or 'minibatch'")
    elif widths_a is None:
        raise ValueError("compare: the loader yielded no batches")

    La, Lb = len(names_a), len(names_b)
    values = torch.zeros(La, Lb, dtype=torch.float64)
    kinds = [["minibatch"] * Lb for _ in range(La)]
    zero_layers: List[str] = []
    n_samples = None
    batches, skipped = batch_no, 0
    if exact is not None:
        n, hxy, hxx, hyy = exact.hsic_terms(group)
        need = 4 if debiased else 2
        if n < need:
            raise ValueError(f"compare: the data set has {int(n)} samples; the exact estimator needs at least {need}"
                             + (" (debiased HSIC divides by n(n-3))" if debiased else ""))
        ia = [i for i, e in enumerate(ea) if e]
        ib = [j for j, e in enumerate(eb) if e]
        cka = _finish(hxy, hxx, hyy, _pick(names_a, ea), _pick(names_b, eb), "exact", zero_layers).cpu()
        values[torch.tensor(ia)[:, None], torch.tensor(ib)[None]] = cka
        for i in ia:
            for j in ib:
                kinds[i][j] = "exact"
        n_samples = int(n)
    if mini is not None:
        n_mb, used, skipped, hxy, hxx, hyy = mini.hsic_terms(group)
        batches = used + skipped
        if skipped:
            warnings.warn(f"compare: {skipped} batch(es) with fewer than {MinibatchStats.MIN_BATCH} samples skipped by the "
                          "minibatch estimator (unbiased HSIC needs 4)", RuntimeWarning, stacklevel=2)
        if used == 0:
            raise ValueError(f"compare: no batch has at least {MinibatchStats.MIN_BATCH} samples, which the minibatch "
                             "estimator needs (unbiased HSIC divides by b(b-3)); use larger batches")
        cka = _finish(hxy, hxx, hyy, names_a, names_b, "minibatch", zero_layers).cpu()
        mask = torch.tensor([[k == "minibatch" for k in row] for row in kinds])
        values = torch.where(mask, cka, values)
        if n_samples is None:
            n_samples = n_mb
    if not torch.isfinite(values).all():  # cannot happen for finite features; never hand back NaN silently
        raise ValueError("compare: a CKA value is not finite (overflow in the features or their products? try product_dtype=torch.float64)")
    if zero_layers:
        warnings.warn(f"compare: layer(s) {', '.join(map(repr, zero_layers[:6]))} do not vary over the data (or have a "
                      "non-positive debiased self-HSIC): their CKA is reported as 0", RuntimeWarning, stacklevel=2)
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
            "device": str(dev), "world_size": torch.distributed.get_world_size(group) if dist_on else 1,
            "memory_budget": budget, "estimator_requested": estimator}
    if auto_info is not None:
        meta["auto"] = auto_info
    return CompareResult(values=values, layers_a=names_a, layers_b=names_b, estimators=kinds, n_samples=int(n_samples),
                         kernel=kernel, sigma=sigma, debiased=debiased, model_a=type(ma).__name__,
                         model_b=type(mb).__name__ if not same else type(ma).__name__,
                         widths_a=widths_a, widths_b=widths_b, batches=batches, skipped_batches=skipped, meta=meta)

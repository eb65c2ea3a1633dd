"""``rk.compare``: layer-by-layer CKA of two networks over a data set.

    res = rk.compare(teacher, student, loader)           # every default layer pair
    res.values                                           # (len(res.layers_a), len(res.layers_b)) float64
    res.plot("cka.png"); res.save("cka.json")

One quantity per result (``res.estimator``):
  "minibatch"  (default) Nguyen et al. (2021): each batch's unbiased HSIC of every pair,
               summed over batches, then CKA: what the peer libraries compute, comparable with
               the literature; any kernel; depends on the batch size; batches of fewer than 4
               samples are skipped with a warning (``debiased`` does not apply).
  "exact"      the CKA of the whole data set, equal to
               ``rk.cka(cat(features of layer i), cat(features of layer j), debiased=...)``
               whatever the batch size (linear kernel), from feature-space sums whose size
               does not depend on the number of samples (``stats.ExactStats``); a request
               whose statistics do not fit ``memory_budget`` is a ValueError before they are
               allocated.
Parts: ``hooks`` (layers, their outputs as produced, feeding the model, its training flags),
``stats`` (the two accumulators), ``estimators`` (HSIC -> CKA, shared with the library);
``compare`` here only orchestrates. Values are never clamped. A layer whose features do not
vary (or, debiased, whose self-HSIC is not positive) gives CKA 0 with a warning naming it.
"""

from __future__ import annotations

import datetime
import json
import math
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Union

import torch
from torch import nn

from .. import _validate, estimators
from ..distributed import is_distributed
from .hooks import Caller, EvalMode, LayerOutputs, resolve_layers, to_device, unwrap
from .stats import ExactStats, MinibatchStats, exact_bytes, work_dtype

__all__ = ["compare", "CompareResult", "DEFAULT_MEMORY_BUDGET"]

Tensor = torch.Tensor

#: bytes of statistics the exact estimator may hold
DEFAULT_MEMORY_BUDGET = 1 << 30
ESTIMATORS = ("minibatch", "exact")


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
    estimator: str
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

    def __getitem__(self, key):
        """``res["layer_a", "layer_b"]`` -> the CKA of that pair (a float)."""
        a, b = key
        return float(self.values[self.layers_a.index(a), self.layers_b.index(b)])

    def table(self, digits: int = 3) -> str:
        """The matrix as a markdown table (rows: layers_a, columns: layers_b)."""
        head = f"| {self.model_a} \\ {self.model_b} | " + " | ".join(self.layers_b) + " |"
        lines = [head, "|" + "---|" * (len(self.layers_b) + 1)]
        for i, a in enumerate(self.layers_a):
            cells = [f"{v:.{digits}f}" for v in self.values[i].tolist()]
            lines.append(f"| {a} | " + " | ".join(cells) + " |")
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
        ``path`` is given. ``annotate`` (default: up to 16 x 16 cells) prints the values.
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
            "estimator": self.estimator,
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
                       estimator=str(d["estimator"]), n_samples=int(d["n_samples"]),
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


# ----------------------------------------------------------------------------- compare


class _Layout:
    """Streams (the distinct (model, layer) outputs: a model compared with itself runs once),
    each A and B layer's stream, and the stream pairs whose HSIC the result needs."""

    def __init__(self, ma: nn.Module, mb: nn.Module, names_a: List[str], names_b: List[str]):
        self.same = mb is ma
        self.labels: List[str] = []
        self.hooked: List[Dict[str, str]] = [{}, {}]  # per model: layer name -> label

        def stream(model: int, name: str) -> int:
            label = name if model == 0 else f"model_b.{name}"
            if name not in self.hooked[model]:
                self.hooked[model][name] = label
                self.labels.append(label)
            return self.labels.index(label)

        self.ia = [stream(0, n) for n in names_a]
        self.ib = [stream(0 if self.same else 1, n) for n in names_b]
        cross = {(min(u, v), max(u, v)) for u in self.ia for v in self.ib}
        self.pairs = sorted(cross | {(u, u) for u in self.ia + self.ib})
        self.index = {label: u for u, label in enumerate(self.labels)}


def _check_args(estimator, kernel, sigma, product_dtype, model_a, model_b) -> None:
    if estimator not in ESTIMATORS:
        raise ValueError(f"compare: estimator must be one of {ESTIMATORS}, got {estimator!r}")
    _validate.check_kernel("compare", kernel, sigma)
    if isinstance(sigma, Tensor):
        raise ValueError("compare: sigma must be a float or 'median'/'mean' here (one bandwidth per layer and batch)")
    if kernel != "linear" and estimator == "exact":
        raise ValueError("compare: the exact estimator needs the linear kernel (its statistics live in feature space); "
                         "use estimator='minibatch' with kernel='rbf'")
    if product_dtype not in (None, torch.float32, torch.float64):
        raise ValueError(f"compare: product_dtype must be None, torch.float32 or torch.float64, got {product_dtype!r}")
    if not isinstance(model_a, nn.Module) or (model_b is not None and not isinstance(model_b, nn.Module)):
        raise TypeError("compare: model_a and model_b must be torch.nn.Module (model_b may be None)")


def _non_finite(batch_no: int, labels: List[str]) -> ValueError:
    more = f" (also {', '.join(map(repr, labels[1:4]))})" if len(labels) > 1 else ""
    return ValueError(f"compare: batch {batch_no}: layer {labels[0]!r} has NaN or Inf features{more}")


class _Run:
    """One pass over the loader: checks each layer's output as it comes (rows, width) and feeds
    the estimator's accumulator; the exact one gets each batch whole (its first batch sets the
    shifts and, with the widths, the memory it needs)."""

    def __init__(self, layout: _Layout, estimator: str, kernel, sigma, debiased, budget, product_dtype, device, group):
        self.layout, self.estimator, self.debiased, self.budget = layout, estimator, debiased, budget
        self.product_dtype, self.device, self.group = product_dtype, device, group
        self.widths: Optional[List[int]] = None
        self.feats: Dict[int, Tensor] = {}  # the exact estimator's batch, whole
        self.first_widths: Dict[int, int] = {}
        self.stats: Any = None
        if estimator == "minibatch":
            self.stats = MinibatchStats(len(layout.labels), layout.pairs, kernel, sigma, device,
                                        torch.float64 if product_dtype == torch.float64 else torch.float32)
        self.batch_no, self.rows, self.first = 0, None, None

    def sink(self, label: str, f: Tensor) -> None:
        u = self.layout.index[label]
        if self.rows is None:
            self.rows, self.first = f.shape[0], label
        elif f.shape[0] != self.rows:
            raise ValueError(f"compare: batch {self.batch_no}: layer {label!r} has {f.shape[0]} rows but {self.first!r} has "
                             f"{self.rows}; every layer's output must lead with the batch dimension")
        if self.widths is not None and f.shape[1] != self.widths[u]:
            raise ValueError(f"compare: batch {self.batch_no}: layer {label!r} has {f.shape[1]} features, {self.widths[u]} in "
                             "the first batch; the widths must not change")
        if self.widths is None:
            self.first_widths[u] = f.shape[1]
        if self.estimator == "exact":
            self.feats[u] = f
        if self.estimator == "minibatch":
            try:
                self.stats.add(u, f)
            except ValueError:
                if bool(torch.isfinite(f).all()):
                    raise
                raise _non_finite(self.batch_no, [label]) from None

    def end_batch(self) -> None:
        labels = self.layout.labels
        if self.widths is None:
            self.widths = [self.first_widths[u] for u in range(len(labels))]
            if self.estimator == "exact":
                self._start_exact()
        if self.estimator == "exact":
            probe = self.stats.update([self.feats[u] for u in range(len(labels))])
        else:
            probe = self.stats.update()
        self.feats = {}
        if probe is not None and not math.isfinite(float(probe.sum())):  # one host read per batch
            bad = [labels[u] for u in range(len(labels)) if not math.isfinite(float(probe[u]))]
            raise _non_finite(self.batch_no, bad or labels)
        self.batch_no, self.rows = self.batch_no + 1, None

    def _start_exact(self) -> None:
        dtype = work_dtype(self.feats[0].dtype, self.product_dtype)
        need = exact_bytes(self.widths, self.layout.pairs, self.debiased, dtype.itemsize)
        if need > self.budget:
            wide = ", ".join(f"{label!r} ({w})" for label, w in sorted(zip(self.layout.labels, self.widths), key=lambda t: -t[1])[:4])
            raise ValueError(f"compare: the exact estimator needs {need / 2**30:.2f} GiB of statistics for these layers (widest: "
                             f"{wide}), over memory_budget={self.budget / 2**30:.2f} GiB; compare fewer or narrower layers, "
                             "raise memory_budget, or use estimator='minibatch'")
        self.stats = ExactStats(self.widths, self.layout.pairs, self.debiased, self.device, dtype)
        shift = [self.feats[u].to(torch.float64).mean(0) for u in range(len(self.widths))]
        self.stats.set_shift(_agree_on_shift(shift, self.widths, self.device, self.group))


class PeerFailed(RuntimeError):
    """Another rank of the process group failed (its own error says why)."""


def _settle(failed: bool, device, group) -> None:
    """Under torch.distributed, whether any rank failed, learnt by every rank in one collective
    (the first of a run, and again after the batches): a rank that raises takes part in it
    before raising, so the others raise too instead of waiting for it in the next collective."""
    if not is_distributed(group):
        return
    flag = torch.tensor([float(failed)], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=group)
    if flag.item() > 0 and not failed:
        raise PeerFailed("compare: another rank failed (its error says why); every rank stops")


def _agree_on_shift(shift: List[Tensor], widths, device, group) -> List[Tensor]:
    """Under torch.distributed every rank shifts by rank 0's."""
    if not is_distributed(group):
        return shift
    _settle(False, device, group)
    flat = torch.cat(shift)
    torch.distributed.broadcast(flat, src=torch.distributed.get_global_rank(group, 0) if group is not None else 0, group=group)
    return list(flat.split(widths))


def _progress(loader, enabled: bool):
    if enabled:
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return loader
        return tqdm(loader, desc="compare", file=sys.stderr, leave=False)
    return loader


def _values(run: _Run, layout: _Layout) -> Tensor:
    """The CKA matrix from the accumulated HSIC; 0 with a warning where a layer's self term is not positive."""
    h = run.stats.result()
    hxy = torch.stack([torch.stack([h[(min(u, v), max(u, v))] for v in layout.ib]) for u in layout.ia])
    hxx = torch.stack([h[(u, u)] for u in layout.ia])[:, None]
    hyy = torch.stack([h[(v, v)] for v in layout.ib])[None]
    values = estimators.cka(hxy, hxx, hyy).cpu()
    flat = [layout.labels[u] for u in layout.ia + layout.ib]
    zero = list(dict.fromkeys(lb for lb, hs in zip(flat, torch.cat([hxx[:, 0], hyy[0]]).tolist())
                              if not hs > torch.finfo(torch.float64).tiny))
    if zero:
        warnings.warn(f"compare: layer(s) {', '.join(map(repr, zero[:6]))} do not vary over the data (or have a non-positive "
                      "debiased self-HSIC): their CKA is reported as 0", RuntimeWarning, stacklevel=3)
    if not torch.isfinite(values).all():
        raise ValueError("compare: a CKA value is not finite (overflow in the features or their products? "
                         "try product_dtype=torch.float64)")
    return values


def compare(model_a: nn.Module, model_b: Optional[nn.Module], loader: Iterable, layers_a=None, layers_b=None, *,
            kernel: str = "linear", sigma=None, estimator: str = "minibatch", debiased: bool = False, device=None,
            progress: bool = True, memory_budget: Union[int, str] = DEFAULT_MEMORY_BUDGET,
            inputs: Optional[Callable[[Any], Any]] = None, max_batches: Optional[int] = None,
            product_dtype: Optional[torch.dtype] = None, group=None) -> CompareResult:
    """CKA of every layer of ``model_a`` with every layer of ``model_b`` over ``loader``.

    Args:
      model_a, model_b: ``nn.Module``s; ``model_b`` ``None`` or ``model_a`` itself compares the
        model with itself (one forward pass per batch). Both run in eval mode under
        ``torch.no_grad()``; every submodule's training flag is restored afterwards. With
        ``device`` they are moved there (as ``.to(device)``).
      loader: any iterable of batches: a tensor, a tuple/list whose first element is the input,
        or a dict, passed as keyword arguments where the model's forward takes them, else its
        first key of ``hooks.INPUT_KEYS``; ``inputs=callable`` maps a batch to the model input
        (a tuple: positional arguments, a dict: keywords). Inputs move to ``device``.
      layers_a, layers_b: module names as in ``named_modules()``; ``None``: ``default_layers``
        (``layers_b`` defaults to ``layers_a`` when the models are the same). A layer's output
        is flattened to (n, -1); a tuple gives its first element, an object with
        ``last_hidden_state`` that.
      kernel: "linear" or "rbf" (``sigma`` a float or "median"/"mean", per batch; minibatch only).
      estimator: "minibatch" (default) or "exact" (module docstring).
      debiased: the exact estimator with Song et al.'s unbiased HSIC (Kornblith's debiased CKA).
      memory_budget: bytes (or "512MiB") the exact estimator's statistics may take.
      product_dtype: dtype of the per-batch products; default float32 (float64 for float64
        features); sums over batches are float64 either way.
      max_batches: stop after this many batches. group: the torch.distributed process group:
        each rank feeds its shard; every rank gets the result of the concatenated data.
    Returns: ``CompareResult``.
    """
    _check_args(estimator, kernel, sigma, product_dtype, model_a, model_b)
    budget = _parse_bytes(memory_budget)
    ma = unwrap(model_a)
    mb = ma if model_b is None or unwrap(model_b) is ma else unwrap(model_b)
    names_a = resolve_layers(ma, layers_a, "model_a")
    names_b = list(names_a) if layers_b is None and mb is ma else resolve_layers(mb, layers_b, "model_b")
    dev = torch.device(device) if device is not None else next((t.device for t in ma.parameters()), torch.device("cpu"))
    if device is not None:
        ma.to(dev), mb.to(dev)
    layout = _Layout(ma, mb, names_a, names_b)
    run = _Run(layout, estimator, kernel, sigma, debiased, budget, product_dtype, dev, group)
    models = [ma] if layout.same else [ma, mb]
    rank0 = not is_distributed(group) or torch.distributed.get_rank(group) == 0
    try:
        _feed(run, models, inputs, loader, max_batches, progress and rank0, dev)
    except PeerFailed:  # learnt in the shift agreement of the exact estimator's first batch
        raise
    except Exception:
        _settle(True, dev, group)
        raise
    _settle(False, dev, group)
    if estimator == "exact":
        run.stats.flush()  # the rows still waiting for their block's products
    if is_distributed(group):
        run.stats.all_reduce(group)
    _check_samples(run, estimator, debiased)
    values = _values(run, layout)
    mini = estimator == "minibatch"
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
            "device": str(dev), "world_size": torch.distributed.get_world_size(group) if is_distributed(group) else 1,
            "memory_budget": budget}
    return CompareResult(values=values, layers_a=names_a, layers_b=names_b, estimator=estimator, n_samples=run.stats.n,
                         kernel=kernel, sigma=sigma, debiased=debiased, model_a=type(ma).__name__, model_b=type(mb).__name__,
                         widths_a=[run.widths[u] for u in layout.ia], widths_b=[run.widths[u] for u in layout.ib],
                         batches=run.stats.batches + run.stats.skipped if mini else run.batch_no,
                         skipped_batches=run.stats.skipped if mini else 0, meta=meta)


def _feed(run: _Run, models: List[nn.Module], inputs, loader, max_batches, progress: bool, dev) -> None:
    """Every batch through the models, each hooked layer's output to ``run``."""
    ma, mb = models[0], models[-1]
    with EvalMode(*models), torch.no_grad(), LayerOutputs(ma, run.layout.hooked[0], run.sink) as ha, \
            LayerOutputs(mb, run.layout.hooked[1], run.sink) as hb:
        calls = [(Caller(m, inputs), h) for m, h in zip(models, (ha, hb))]
        for batch in _progress(loader, progress):
            if max_batches is not None and run.batch_no >= max_batches:
                break
            for call, hooks in calls:
                call(*to_device(call.args(batch), dev))
                hooks.done()
            run.end_batch()
    if run.stats is None or run.widths is None:
        raise ValueError("compare: the loader yielded no batches" + (" (on this rank)" if is_distributed(run.group) else ""))


def _check_samples(run: _Run, estimator: str, debiased: bool) -> None:
    if estimator == "minibatch":
        if run.stats.skipped:
            warnings.warn(f"compare: {run.stats.skipped} batch(es) with fewer than 4 samples skipped by the minibatch estimator "
                          "(unbiased HSIC needs 4)", RuntimeWarning, stacklevel=3)
        if run.stats.batches == 0:
            raise ValueError("compare: no batch has at least 4 samples, which the minibatch estimator needs (unbiased HSIC "
                             "divides by b(b-3)); use larger batches")
        return
    need, why = estimators.min_rows(debiased)
    if run.stats.n < need:
        raise ValueError(f"compare: the data set has {run.stats.n} samples; the exact estimator needs at least {need}{why}")

"""Layers of a model, their outputs as the forward pass produces them, and feeding a
batch to the model as it expects; the model is handed back as it came."""

from __future__ import annotations

import inspect
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

Tensor = torch.Tensor

#: dict batches whose keys the model's forward does not take: the first of these present is the input
INPUT_KEYS = ("input", "inputs", "x", "image", "images", "pixel_values", "input_ids")
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def unwrap(model: nn.Module) -> nn.Module:
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
            if isinstance(child, _CONTAINERS) and len(child):
                walk(child, f"{prefix}{name}.")
            else:
                out.append(f"{prefix}{name}")

    walk(unwrap(model), "")
    return out


def resolve_layers(model: nn.Module, layers, which: str) -> List[str]:
    """Checked layer names of ``model`` (``which``: "model_a" or "model_b"); None: the default layers."""
    names = dict(unwrap(model).named_modules())
    arg = f"layers_{which[-1]}"
    layers = default_layers(model) if layers is None else [layers] if isinstance(layers, str) else list(layers)
    if not layers:
        raise ValueError(f"compare: {arg} is empty" if names else f"compare: {which} has no sub-modules; name its layers with {arg}=")
    for name in layers:
        if not isinstance(name, str):
            raise TypeError(f"compare: layer names are strings as in named_modules(), got {name!r} in {arg}")
        if name == "" or name not in names:
            close = [k for k in names if k and (name in k or k in name)][:5]
            hint = f"; similar: {', '.join(close)}" if close else ""
            raise ValueError(f"compare: {which} has no layer {name!r} (names as in named_modules(){hint})")
    dup = sorted({n for n in layers if layers.count(n) > 1})
    if dup:
        raise ValueError(f"compare: {arg} names {', '.join(map(repr, dup))} more than once")
    return layers


def as_features(label: str, out: Any) -> Tensor:
    """A layer output as (n, features): tuple/list -> first element, ``last_hidden_state`` -> it (repeatedly)."""
    for _ in range(8):
        if isinstance(out, (tuple, list)) and out:
            out = out[0]
        elif not isinstance(out, Tensor) and hasattr(out, "last_hidden_state"):
            out = out.last_hidden_state
        else:
            break
    if not isinstance(out, Tensor):
        raise TypeError(f"compare: layer {label!r} returned {type(out).__name__}, not a tensor (or a tuple / an object with "
                        "last_hidden_state holding one)")
    if out.ndim == 0:
        raise ValueError(f"compare: layer {label!r} returned a scalar; a layer's output must have a batch dimension")
    if not out.is_floating_point():
        raise TypeError(f"compare: layer {label!r} returned {out.dtype} features; CKA needs floating-point features")
    return out.detach().reshape(out.shape[0], -1)


class LayerOutputs:
    """Forward hooks on ``layers`` {name: label} of ``model``: each output, as (n, features),
    goes to ``sink(label, features)`` as the forward pass produces it. A context manager:
    the hooks are removed on exit, whatever happened. ``done()`` after each forward pass
    checks that every layer ran exactly once."""

    def __init__(self, model: nn.Module, layers: Dict[str, str], sink: Callable[[str, Tensor], None]):
        self.model, self.layers, self.sink = model, layers, sink
        self.calls: Dict[str, int] = {}
        self.handles: List[Any] = []

    def __enter__(self) -> "LayerOutputs":
        mods = dict(self.model.named_modules())
        self.handles = [mods[name].register_forward_hook(self._hook(name)) for name in self.layers]
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()

    def _hook(self, name: str):
        label = self.layers[name]

        def hook(module, inputs, output):
            calls = self.calls[name] = self.calls.get(name, 0) + 1
            if calls > 1:
                raise ValueError(f"compare: layer {label!r} ran {calls} times in one forward pass, so its output is "
                                 "ambiguous (a module reused inside the model); name a layer that runs once")
            self.sink(label, as_features(label, output))
        return hook

    def done(self) -> None:
        missing = [label for name, label in self.layers.items() if name not in self.calls]
        self.calls = {}
        if missing:
            raise ValueError(f"compare: layer {missing[0]!r} did not run in the forward pass")


class Caller:
    """Calls ``model`` on a batch the way it expects: ``inputs(batch)`` if given (a tuple is
    passed as positional arguments, a dict as keywords); a tensor as is; a tuple/list's first
    element (a DataLoader's (x, y)); a dict as keyword arguments where the model's forward
    takes them, else its first ``INPUT_KEYS`` entry. One warning names dict keys not passed."""

    def __init__(self, model: nn.Module, inputs: Optional[Callable[[Any], Any]]):
        self.model, self.inputs, self.warned = model, inputs, False
        params = inspect.signature(unwrap(model).forward).parameters.values()
        self.var_kw = any(p.kind is p.VAR_KEYWORD for p in params)
        self.keywords = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}

    def args(self, batch: Any):
        """(args, kwargs) for the model."""
        if self.inputs is not None:
            x = self.inputs(batch)
            return (tuple(x), {}) if isinstance(x, tuple) else ((), dict(x)) if isinstance(x, dict) else ((x,), {})
        if isinstance(batch, Tensor):
            return (batch,), {}
        if isinstance(batch, (tuple, list)):
            if not batch:
                raise ValueError("compare: the loader gave an empty tuple/list batch")
            return (batch[0],), {}
        if isinstance(batch, dict):
            return self._dict_args(batch)
        raise TypeError(f"compare: a batch must be a tensor, a tuple/list whose first element is the input, or a dict; "
                        f"got {type(batch).__name__} (or pass inputs=callable)")

    def _dict_args(self, batch: Dict[str, Any]):
        taken = [k for k in batch if self.var_kw or k in self.keywords]
        if taken:
            args, kwargs = (), {k: batch[k] for k in taken}
        else:
            key = next((k for k in INPUT_KEYS if k in batch), None)
            if key is None:
                raise ValueError(f"compare: a dict batch needs keys the model's forward takes or one of {', '.join(INPUT_KEYS)} "
                                 f"(or pass inputs=callable); it has {', '.join(map(str, batch))}")
            args, kwargs, taken = (batch[key],), {}, [key]
        left = [k for k in batch if k not in taken]
        if left and not self.warned:
            self.warned = True
            warnings.warn(f"compare: batch keys {', '.join(map(repr, left))} are not passed to the model (its forward does not "
                          "take them)", RuntimeWarning, stacklevel=4)
        return args, kwargs

    def __call__(self, args: Sequence[Any], kwargs: Dict[str, Any]) -> None:
        self.model(*args, **kwargs)


def to_device(x: Any, device: torch.device) -> Any:
    if isinstance(x, Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(to_device(v, device) for v in x)
    return x


class EvalMode:
    """Every submodule in eval mode inside the context; each one's own training flag back afterwards."""

    def __init__(self, *models: nn.Module):
        self.models = models
        self.flags = {m: m.training for model in models for m in model.modules()}

    def __enter__(self) -> "EvalMode":
        for model in self.models:
            model.eval()
        return self

    def __exit__(self, *exc) -> None:
        for m, flag in self.flags.items():
            m.training = flag

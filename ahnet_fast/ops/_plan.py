"""Values derived from parameters and buffers, built once and rebuilt only when a source changes.

A conv layer's packed weights and an eval-mode BatchNorm folded into per-channel (scale, shift)
depend on nothing but the layer's own tensors, yet building them costs several small device
launches. At batch 1 on a GPU those launches cost more than the conv itself, so the fused
pipeline asks this cache instead of rebuilding them on every call.

A cached value is valid while every source tensor is the same Python object (held by weak
reference, so the cache never keeps a model alive) with the same storage, dtype, shape and
in-place version counter (``_version``). That covers every way a parameter or buffer changes:
optimizer steps and ``load_state_dict`` write in place (version bump), ``module.to()`` swaps the
storage (new data_ptr / dtype / device), and a new tensor is a new object. Under
``torch.compile`` nothing is cached (dynamo cannot trace the lookup, and inductor hoists such
constants itself).
"""
from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import Any, Callable, Hashable, Optional, Sequence

import torch

__all__ = ["cached", "clear", "stats"]

Tensor = torch.Tensor

# Enough for several models of ~120 layers with a few derived values each; the oldest entries
# go first (they belong to models or casts that no longer run).
_MAX_ENTRIES = 4096
_cache: "OrderedDict[tuple, tuple[tuple, Any]]" = OrderedDict()
_counts = {"hits": 0, "builds": 0}


def _signature(t: Optional[Tensor]) -> tuple:
    if t is None:
        return (None,)
    return (weakref.ref(t), t.data_ptr(), t._version, t.dtype, t.device, tuple(t.shape), tuple(t.stride()))


def _valid(saved: tuple, t: Optional[Tensor]) -> bool:
    if t is None:
        return saved == (None,)
    ref, *rest = saved
    return ref() is t and tuple(rest) == _signature(t)[1:]


def cached(tag: str, sources: Sequence[Optional[Tensor]], build: Callable[[], Any],
           extra: Hashable = ()) -> Any:
    """``build()``, memoised on (``tag``, the identity and state of ``sources``, ``extra``).

    ``sources`` are the tensors the value is computed from (None allowed); ``extra`` holds the
    non-tensor inputs (eps, a dtype...). ``build`` must depend on nothing else.
    """
    if torch.compiler.is_compiling():
        return build()
    key = (tag, tuple(id(t) if t is not None else None for t in sources), extra)
    hit = _cache.get(key)
    if hit is not None and all(_valid(s, t) for s, t in zip(hit[0], sources)):
        _cache.move_to_end(key)
        _counts["hits"] += 1
        return hit[1]
    value = build()
    _cache[key] = (tuple(_signature(t) for t in sources), value)
    _cache.move_to_end(key)
    while len(_cache) > _MAX_ENTRIES:
        _cache.popitem(last=False)
    _counts["builds"] += 1
    return value


def clear() -> None:
    """Drop every cached value (tests; or to release memory held by values of dead models)."""
    _cache.clear()


def stats() -> dict[str, int]:
    """{"hits", "builds", "entries"}: how often the cache answered and how often it built."""
    return {**_counts, "entries": len(_cache)}

"""Committing BatchNorm running statistics and batch counters: per layer, or once per forward.

The fused training ops are functional (torch.library cannot attach autograd to an op that
mutates its inputs), so they return the next running mean/variance instead of writing the
buffers, and the caller commits them. Committed one layer at a time that is one multi-tensor
copy per BN layer plus one ``num_batches_tracked += 1``; a model can instead open
:func:`deferred_running_updates` around its forward and have every layer's values committed by
two multi-tensor launches for the whole network (``torch._foreach_copy_`` for the statistics,
``torch._foreach_add_`` for the counters), where nn.BatchNorm issues about three launches per
layer.

Deferring is exact: in training mode a BatchNorm never reads its running statistics to
normalise (it uses the batch's); a layer called again in the same forward (shared weights)
first has the pending values written (:func:`current`), since its next values start from
them; and the counter's pending increment is added wherever a layer reads it
(``momentum=None``, the cumulative average). A forward that raises commits nothing.
Under ``torch.compile`` nothing is deferred (dynamo cannot trace the context variable; the
compiled graph batches the copies itself).
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Optional

import torch

Tensor = torch.Tensor

__all__ = ["commit", "count_batch", "current", "deferred_running_updates", "pending_value"]


class _Pending:
    def __init__(self) -> None:
        self.dst: list[Tensor] = []
        self.src: list[Tensor] = []
        self.pending_ids: set[int] = set()  # id() of every buffer in dst: an O(1) check per layer
        self.counters: dict[int, tuple[Tensor, int]] = {}

    def flush_statistics(self) -> None:
        if self.dst:
            torch._foreach_copy_(self.dst, self.src)
        self.dst, self.src = [], []
        self.pending_ids.clear()

    def flush(self) -> None:
        self.flush_statistics()
        if self.counters:
            by_step: dict[int, list[Tensor]] = {}
            for t, k in self.counters.values():
                by_step.setdefault(k, []).append(t)
            for k, ts in by_step.items():
                torch._foreach_add_(ts, k)


_PENDING: contextvars.ContextVar[Optional[_Pending]] = contextvars.ContextVar("ahnet_fast_running", default=None)


def _active() -> Optional[_Pending]:
    if torch.compiler.is_compiling():
        return None
    return _PENDING.get()


@contextlib.contextmanager
def deferred_running_updates() -> Iterator[None]:
    """Inside, running statistics and batch counters are collected and committed together when
    the block ends without an exception (nested blocks join the outermost one)."""
    if _active() is not None or torch.compiler.is_compiling():
        yield
        return
    pending = _Pending()
    token = _PENDING.set(pending)
    try:
        yield
    finally:
        _PENDING.reset(token)
    pending.flush()


def commit(running_mean: Tensor, running_var: Tensor, next_mean: Tensor, next_var: Tensor) -> None:
    """Write a layer's next running statistics into its buffers (now, or with the block's batch)."""
    pending = _active()
    if pending is None:
        torch._foreach_copy_([running_mean, running_var], [next_mean, next_var])
        return
    pending.dst += (running_mean, running_var)
    pending.src += (next_mean, next_var)
    pending.pending_ids.update((id(running_mean), id(running_var)))


def count_batch(num_batches_tracked: Tensor) -> None:
    """``num_batches_tracked += 1``, now or with the block's batch (read the counter through
    :func:`pending_value`, which adds the increments not committed yet)."""
    pending = _active()
    if pending is None:
        num_batches_tracked.add_(1)
        return
    key = id(num_batches_tracked)
    t, k = pending.counters.get(key, (num_batches_tracked, 0))
    pending.counters[key] = (t, k + 1)


def pending_value(num_batches_tracked: Tensor) -> float:
    """The counter's value including increments not committed yet (a host read)."""
    pending = _active()
    extra = 0
    if pending is not None:
        extra = pending.counters.get(id(num_batches_tracked), (None, 0))[1]
    return float(num_batches_tracked) + extra


def current(*buffers) -> None:
    """Make the given running-statistics buffers hold their latest values before a layer reads
    them (a layer run twice in one deferred forward): pending statistics are written now."""
    pending = _active()
    if pending is None or not pending.dst:
        return
    if any(b is not None and id(b) in pending.pending_ids for b in buffers):
        pending.flush_statistics()

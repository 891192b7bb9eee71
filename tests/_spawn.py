"""Starting the 2-process gloo tests (imported by tests/test_distributed_sync_bn.py and
tests/test_distributed_train.py)."""
from __future__ import annotations

from typing import Callable

import torch.multiprocessing as mp


def spawn_ranks(fn: Callable[..., None], nprocs: int, args_for: Callable[[int], tuple]) -> int:
    """``mp.spawn(fn, args_for(attempt), nprocs)``; returns the attempt that succeeded (0 or 1).

    A rank killed by a signal is retried once, with fresh arguments (a new rendezvous file and
    output folder: ``args_for`` gets the attempt number); a failed assertion or any other Python
    exception in a rank (``ProcessRaisedException``) is never retried, and a second abort is
    reported. The known cause of such aborts, gloo threads outliving the group into interpreter
    shutdown, is removed at its root (workers call preload_group_pinning_modules before
    init_process_group; test_destroy_process_group_frees_gloo_after_fused_ops checks it). What
    the retry guards is not known: gloo has aborted a rank with "terminate called without an
    active exception" about once in twenty to a hundred 2-process runs on a loaded 2-core
    machine (in the sync-BN tests and once in the DDP training test).
    """
    try:
        mp.spawn(fn, args=args_for(0), nprocs=nprocs, join=True)
        return 0
    except mp.ProcessExitedException as exc:
        if exc.signal_name is None:
            raise
    mp.spawn(fn, args=args_for(1), nprocs=nprocs, join=True)
    return 1

"""tests/_spawn.py: the 2-process tests retry a rank killed by a signal once, never a failed check."""
from __future__ import annotations

import os

import pytest
import torch.multiprocessing as mp

from _spawn import spawn_ranks


def _abort() -> None:
    """SIGABRT, as gloo's rare abort kills a rank; no core file left in the working tree."""
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    os.abort()


def _abort_on_first_attempt(rank: int, marker: str) -> None:
    if rank == 1 and marker.endswith("0"):
        _abort()


def _always_abort(rank: int, marker: str) -> None:
    if rank == 1:
        _abort()


def _fail_check(rank: int, marker: str) -> None:
    with open(f"{marker}.rank{rank}", "a") as f:
        f.write("ran\n")
    assert rank == 0, "a failed check in rank 1"


@pytest.mark.timeout(120)
def test_a_rank_killed_by_a_signal_is_retried_once_with_fresh_arguments(tmp_path):
    seen = []

    def args_for(attempt: int) -> tuple:
        seen.append(attempt)
        return (str(tmp_path / f"attempt{attempt}"),)

    assert spawn_ranks(_abort_on_first_attempt, 2, args_for) == 1
    assert seen == [0, 1]


@pytest.mark.timeout(120)
def test_a_second_abort_is_reported(tmp_path):
    with pytest.raises(mp.ProcessExitedException) as info:
        spawn_ranks(_always_abort, 2, lambda a: (str(tmp_path / f"attempt{a}"),))
    assert info.value.signal_name == "SIGABRT"


@pytest.mark.timeout(120)
def test_a_failed_check_is_never_retried(tmp_path):
    with pytest.raises(mp.ProcessRaisedException, match="a failed check in rank 1"):
        spawn_ranks(_fail_check, 2, lambda a: (str(tmp_path / f"attempt{a}"),))
    assert (tmp_path / "attempt0.rank1").is_file() and not (tmp_path / "attempt1.rank1").exists()

"""The one exception type the data pipeline raises for bad input."""
from __future__ import annotations

from pathlib import Path


class DataError(ValueError):
    """Bad training/inference data: the message names the file and what was wrong.

    Subclasses ``ValueError`` so callers that already catch ``ValueError`` keep
    working; the CLI catches it and prints the message without a traceback.
    """

    def __init__(self, path: str | Path | None, problem: str) -> None:
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(problem if path is None else f"{path}: {problem}")

"""`ahnet-fast info`: versions, devices and which backends are usable here (see ahnet_fast.info)."""
from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "info", help="versions, devices, CUDA extension build and usable backends",
        description="Print versions (ahnet_fast, python, torch, CUDA, cuDNN, triton, nvcc), the CUDA "
                    "extension's build metadata, the visible devices and, for each backend (reference, "
                    "triton, cuda), whether it is usable here and why not.")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from ahnet_fast.info import run

    return run(as_json=args.json)

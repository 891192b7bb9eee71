"""`ahnet-fast` command line: one module per sub-command in this package.

Each sub-command module defines ``register(subparsers)`` which adds its parser
and sets ``func`` (a callable taking the parsed args and returning an exit
code). Modules import heavy dependencies inside ``func`` so that
``ahnet-fast --help`` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

# sub-command name -> module path; the order is the order shown in --help
COMMANDS = {
    "info": "ahnet_fast.cli.info",
    "train": "ahnet_fast.cli.train",
    "demo": "ahnet_fast.cli.demo",
    "segment": "ahnet_fast.cli.segment",
    "evaluate": "ahnet_fast.cli.evaluate",
    "show": "ahnet_fast.cli.show",
    "bench": "ahnet_fast.cli.bench",
    "warmup": "ahnet_fast.cli.warmup",
}


def device_problem(name: str | None) -> str | None:
    """Why ``name`` is not a usable torch device here (None: usable or not given)."""
    if name is None:
        return None
    import torch

    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        return "not a device name; expected cpu, cuda or cuda:N"
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return (f"CUDA is not available on this machine (torch {torch.__version__}, "
                    f"{'no GPU found' if torch.version.cuda else 'a CPU-only build'}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            return f"there are {torch.cuda.device_count()} GPU(s), numbered 0..{torch.cuda.device_count() - 1}"
    elif dev.type not in ("cpu", "mps", "xpu"):
        return "expected cpu, cuda or cuda:N"
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ahnet-fast", description="Fast anisotropic 3D networks (AH-Net) for CT/MRI segmentation."
    )
    # its own dest: a sub-command's --debug default would overwrite a shared one
    parser.add_argument("--debug", dest="debug_all", action="store_true",
                        help="show full tracebacks (any command; train, demo and segment also take --debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS.values():
        importlib.import_module(module).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("ahnet-fast: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one line, never a traceback
        if getattr(args, "debug", False) or getattr(args, "debug_all", False):
            raise
        text = str(exc).splitlines()[0] if str(exc) else ""
        print(f"ahnet-fast: error: {type(exc).__name__}: {text} (`ahnet-fast --debug {args.command} ...` "
              "shows the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

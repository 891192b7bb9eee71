"""What this installation of ahnet_fast can do here: versions, devices, backends.

    python -m ahnet_fast.info [--json]
    ahnet-fast info [--json]

Prints the versions (ahnet_fast, python, torch and its CUDA/cuDNN, triton, nvcc), the CUDA
extension's build metadata, the visible devices, and for each backend (reference, triton, cuda)
whether it is usable here and why not. Nothing is compiled; CUDA is only queried, never required.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from typing import Any, Sequence

BACKENDS = ("reference", "triton", "cuda")


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _nvcc() -> dict[str, str] | None:
    """nvcc found the way the build looks for it (CUDA_HOME/CUDA_PATH, PATH, /usr/local/cuda)."""
    candidates = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(os.path.join(os.environ[var], "bin", "nvcc"))
    if shutil.which("nvcc"):
        candidates.append(shutil.which("nvcc"))
    candidates.append("/usr/local/cuda/bin/nvcc")
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            try:
                out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout
            except (OSError, subprocess.SubprocessError):
                continue
            match = re.search(r"release [\d.]+, V([\d.]+)", out) or re.search(r"release ([\d.]+)", out)
            return {"path": path, "version": match.group(1) if match else "unknown"}
    return None


def _devices() -> list[dict[str, Any]]:
    import torch

    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        out.append({"index": i, "name": props.name, "capability": f"{props.major}.{props.minor}",
                    "memory_gib": round(props.total_memory / 2**30, 1), "sms": props.multi_processor_count})
    return out


def _fallback_backend_status() -> dict[str, tuple[bool, str]]:
    """Own checks, used only if ahnet_fast.ops.backend_status cannot be imported."""
    import torch

    from ahnet_fast import _cuda

    status: dict[str, tuple[bool, str]] = {"reference": (True, f"plain torch {torch.__version__} ops")}
    triton_version = _package_version("triton")
    if triton_version is None:
        status["triton"] = (False, "triton is not installed")
    elif torch.cuda.is_available():
        status["triton"] = (True, f"triton {triton_version} on {torch.cuda.get_device_name()}")
    elif os.environ.get("TRITON_INTERPRET") == "1":
        status["triton"] = (True, f"triton {triton_version} interpreter (TRITON_INTERPRET=1, CPU; slow)")
    else:
        status["triton"] = (False, "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on the CPU interpreter)")
    status["cuda"] = _cuda.status()
    return status


def backend_status() -> tuple[dict[str, tuple[bool, str]], str]:
    """(name -> (usable, reason), where the answer came from)."""
    try:
        from ahnet_fast.ops import backend_status as ops_backend_status
    except ImportError as exc:
        status = _fallback_backend_status()
        return status, f"own checks (ahnet_fast.ops.backend_status not importable: {exc})"
    try:
        status = dict(ops_backend_status())
    except Exception as exc:  # a broken backend must not hide the report of the others
        status = _fallback_backend_status()
        return status, f"own checks (ahnet_fast.ops.backend_status failed: {type(exc).__name__}: {exc})"
    fallback = None
    for name in BACKENDS:
        if name not in status:
            fallback = fallback or _fallback_backend_status()
            status[name] = fallback[name]
    return status, "ahnet_fast.ops.backend_status"


def collect() -> dict[str, Any]:
    """Everything the report shows, as plain data (what --json prints)."""
    import torch

    import ahnet_fast
    from ahnet_fast import _cuda

    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    backends, source = backend_status()
    return {
        "versions": {
            "ahnet_fast": ahnet_fast.__version__,
            "python": platform.python_version(),
            "platform": f"{platform.system()} {platform.machine()}",
            "torch": torch.__version__,
            "torch_cuda": torch.version.cuda,
            "cudnn": cudnn,
            "triton": _package_version("triton"),
            "nvcc": _nvcc(),
        },
        "build": _cuda.build_info(),
        "devices": _devices(),
        "backend_env": os.environ.get("AHNET_FAST_BACKEND", "auto"),
        "backends": {name: {"usable": bool(ok), "reason": why} for name, (ok, why) in backends.items()},
        "backend_status_source": source,
        "cuda_conv_kernel": _conv_kernel_status(),
    }


def _conv_kernel_status() -> dict[str, Any]:
    """The CUDA conv's kernel policy (wmma / wgmma / auto), whether the wgmma kernel is verified on a
    GPU (the default policy follows it) and whether this machine's GPU runs it."""
    from ahnet_fast import _cuda

    out: dict[str, Any] = {"env": os.environ.get(_cuda.CONV_KERNEL_ENV), "verified_on_gpu": _cuda.WGMMA_VERIFIED_ON_GPU}
    try:
        out["policy"] = _cuda.conv_kernel()
    except _cuda.CudaExtensionError as exc:
        out["policy"] = None
        out["reason"] = str(exc)
    out["wgmma_supported"] = _cuda.wgmma_supported()
    return out


def format_report(data: dict[str, Any]) -> str:
    v = data["versions"]
    nvcc = v["nvcc"]
    lines = [
        f"ahnet_fast {v['ahnet_fast']}",
        f"  python   {v['python']} ({v['platform']})",
        f"  torch    {v['torch']} (CUDA {v['torch_cuda'] or 'none: CPU build'}, cuDNN {v['cudnn'] or 'none'})",
        f"  triton   {v['triton'] or 'not installed'}",
        f"  nvcc     {nvcc['version'] + ' (' + nvcc['path'] + ')' if nvcc else 'not found'}",
    ]
    build = data["build"]
    if build is None:
        lines.append("  build    no build metadata (not installed with pip from the source tree)")
    elif build.get("cuda_extension"):
        lines.append(f"  build    CUDA extension built {build.get('build_date')} for torch {build.get('torch_version')} "
                     f"(CUDA {build.get('torch_cuda')}) with nvcc {build.get('nvcc_version')}, "
                     f"TORCH_CUDA_ARCH_LIST={build.get('cuda_arch_list')}")
    else:
        lines.append(f"  build    CUDA extension not built ({build.get('reason')}); {build.get('build_date')}")
    lines.append("devices")
    if not data["devices"]:
        lines.append("  no CUDA device visible")
    for d in data["devices"]:
        lines.append(f"  cuda:{d['index']}  {d['name']}, sm_{d['capability'].replace('.', '')}, "
                     f"{d['memory_gib']} GiB, {d['sms']} SMs")
    lines.append(f"backends (AHNET_FAST_BACKEND={data['backend_env']})")
    for name, b in data["backends"].items():
        lines.append(f"  {name:<10} {'usable' if b['usable'] else 'not usable':<11} {b['reason']}")
    ck = data.get("cuda_conv_kernel")
    if ck is not None:
        policy = ck["policy"] or "n/a (no usable extension)"
        lines.append(f"  cuda conv  kernel policy {policy} (AHNET_FAST_CUDA_CONV={ck['env'] or 'unset'}); sm_90a wgmma "
                     f"kernel: {'runs on this GPU' if ck['wgmma_supported'] else 'not usable here'}, "
                     f"{'verified' if ck['verified_on_gpu'] else 'not yet verified'} on a GPU"
                     f"{'' if ck['verified_on_gpu'] else ' (so not chosen unless asked for)'}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ahnet_fast.info", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    return run(as_json=args.json)


def run(as_json: bool = False) -> int:
    data = collect()
    print(json.dumps(data, indent=2, default=str) if as_json else format_report(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())

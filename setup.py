"""Build script: the Python package plus, where it can be built, the CUDA extension ``ahnet_fast._C``.

What happens on ``pip install``:

* The package (``ahnet_fast``; the top-level ``kernels/`` folder is installed only as
  ``ahnet_fast.kernels``) is always installed.
* ``csrc/`` is compiled with ninja as the CUDA extension ``ahnet_fast._C`` when torch is importable
  in the build environment, torch is a CUDA build, and nvcc is found. Otherwise the install goes on
  without it and prints one line saying why. pip's default build isolation hides the installed torch
  (torch is deliberately not a build requirement, so the extension is always compiled against the
  torch the user runs): use ``pip install --no-build-isolation ...`` to compile it.
* ``AHNET_FAST_BUILD_CUDA=0`` never builds it; ``=1`` builds it or fails naming what is missing.
* ``TORCH_CUDA_ARCH_LIST`` is honoured; with no visible GPU it defaults to ``8.0;9.0a`` (a visible
  compute capability 9.0 GPU builds ``9.0a`` too: the Hopper conv uses wgmma and the TMA, which exist
  only in the arch-specific sm_90a image; a plain ``9.0`` build runs the WMMA kernels there).
* ``MAX_JOBS`` (parallel nvcc jobs) is bounded by free memory (about 2.5 GiB per job) unless set.
* Build metadata (torch / CUDA / nvcc versions, archs, date) is written to
  ``ahnet_fast/_build_info.json``, which ``ahnet_fast._cuda`` checks before loading the extension.

The functions below are importable without running ``setup()`` (the ``__main__`` guard), so tests
and ``csrc/check_compile.py`` use exactly the decisions and flags the build uses.
"""
from __future__ import annotations

import datetime as _dt
import glob
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from typing import Any, Mapping

ROOT = os.path.dirname(os.path.abspath(__file__))
ENV_SWITCH = "AHNET_FAST_BUILD_CUDA"
DEFAULT_ARCH_LIST = "8.0;9.0a"
MIN_ARCH = (8, 0)  # bf16 tensor cores, cp.async: the kernels are written for sm_80 and newer
GIB_PER_NVCC_JOB = 2.5
BUILD_INFO_NAME = "_build_info.json"
EXTENSION_NAME = "ahnet_fast._C"


class BuildConfigError(RuntimeError):
    """The requested build cannot be made (e.g. AHNET_FAST_BUILD_CUDA=1 without a CUDA toolchain)."""


# --------------------------------------------------------------------------------------------
# decisions (pure functions of their inputs, so they can be tested without a toolchain)
# --------------------------------------------------------------------------------------------
def build_mode(env: Mapping[str, str] | None = None) -> str:
    """'auto' (unset/empty), 'off' (AHNET_FAST_BUILD_CUDA=0) or 'on' (=1); anything else is an error."""
    env = os.environ if env is None else env
    value = env.get(ENV_SWITCH, "").strip()
    if value == "":
        return "auto"
    if value in ("0", "1"):
        return "on" if value == "1" else "off"
    raise BuildConfigError(f"{ENV_SWITCH}={value!r} is not understood: use 0 (never build the CUDA extension), "
                           "1 (build it or fail), or leave it unset (build it where possible)")


def _nvcc_version(nvcc: str) -> str | None:
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release [\d.]+, V([\d.]+)", out) or re.search(r"release ([\d.]+)", out)
    return match.group(1) if match else None


def probe_toolchain() -> dict[str, Any]:
    """Facts about this build environment that decide whether the extension can be built.

    Keys: torch_version, torch_cuda (None for a CPU build), torch_error (why torch is not importable),
    cuda_home, nvcc, nvcc_version, ninja (bool), gpu_capabilities (list of (major, minor)).
    """
    facts: dict[str, Any] = {
        "torch_version": None, "torch_cuda": None, "torch_error": None, "cuda_home": None,
        "nvcc": None, "nvcc_version": None, "ninja": False, "gpu_capabilities": [],
    }
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:  # typical under pip's build isolation
        facts["torch_error"] = f"{type(exc).__name__}: {exc}"
        cpp_extension = None
    else:
        facts["torch_version"] = torch.__version__
        facts["torch_cuda"] = torch.version.cuda
        facts["cuda_home"] = cpp_extension.CUDA_HOME
        facts["ninja"] = cpp_extension.is_ninja_available()
        if torch.version.cuda and torch.cuda.is_available():
            facts["gpu_capabilities"] = sorted(
                {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    # torch.utils.cpp_extension.CUDA_HOME is None for a CPU build of torch even where nvcc exists, so
    # look for nvcc the same way (CUDA_HOME/CUDA_PATH, PATH, /usr/local/cuda) to report what is there.
    home = facts["cuda_home"] or os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = [os.path.join(home, "bin", "nvcc")] if home else []
    which = shutil.which("nvcc")
    if which:
        candidates.append(which)
    candidates.append("/usr/local/cuda/bin/nvcc")
    for nvcc in candidates:
        if os.path.isfile(nvcc) and os.access(nvcc, os.X_OK):
            facts["nvcc"] = nvcc
            facts["nvcc_version"] = _nvcc_version(nvcc)
            break
    if not facts["ninja"] and cpp_extension is None:
        facts["ninja"] = shutil.which("ninja") is not None or importlib.util.find_spec("ninja") is not None
    return facts


def decide_cuda_build(mode: str, facts: Mapping[str, Any]) -> tuple[bool, str]:
    """Whether to build the extension, and a one-line reason.

    mode: 'auto' | 'on' | 'off' (see build_mode). With 'on' a missing piece raises BuildConfigError
    naming every missing piece; with 'auto' it returns (False, reason).
    """
    if mode == "off":
        return False, f"{ENV_SWITCH}=0"
    missing = []
    if facts.get("torch_version") is None:
        missing.append("torch is not importable in the build environment "
                       f"({facts.get('torch_error') or 'not installed'}); pip's build isolation hides the "
                       "installed torch: reinstall with --no-build-isolation")
    elif not facts.get("torch_cuda"):
        missing.append(f"torch {facts['torch_version']} is a CPU-only build (torch.version.cuda is None); "
                       "install a CUDA build of torch")
    if not facts.get("nvcc"):
        missing.append("nvcc not found (looked in CUDA_HOME/CUDA_PATH, PATH and /usr/local/cuda/bin); "
                       "install the CUDA toolkit or set CUDA_HOME")
    elif facts.get("torch_cuda") and not facts.get("cuda_home"):
        missing.append(f"nvcc exists at {facts['nvcc']} but torch.utils.cpp_extension found no CUDA_HOME; "
                       "set CUDA_HOME")
    if not facts.get("ninja"):
        missing.append("ninja not found (pip install ninja)")
    caps = [tuple(c) for c in facts.get("gpu_capabilities") or []]
    old = [c for c in caps if c < MIN_ARCH]
    if old and not missing and mode == "auto":
        missing.append("visible GPU(s) with compute capability "
                       + ", ".join(f"{a}.{b}" for a, b in old)
                       + f" < {MIN_ARCH[0]}.{MIN_ARCH[1]}, which the kernels need")
    if missing:
        if mode == "on":
            raise BuildConfigError(f"{ENV_SWITCH}=1 but the CUDA extension cannot be built: " + "; ".join(missing))
        return False, "; ".join(missing)
    return True, f"torch {facts['torch_version']} (CUDA {facts['torch_cuda']}), nvcc {facts.get('nvcc_version')}"


def _parse_arch(arch: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)\.(\d+)a?(\+PTX)?", arch.strip())
    if not match:
        raise BuildConfigError(f"TORCH_CUDA_ARCH_LIST entry {arch!r} is not understood; use e.g. '8.0;9.0'")
    return int(match.group(1)), int(match.group(2))


def resolve_arch_list(env: Mapping[str, str] | None = None,
                      gpu_capabilities: list[tuple[int, int]] | None = None) -> str:
    """The TORCH_CUDA_ARCH_LIST to build for.

    The user's TORCH_CUDA_ARCH_LIST wins (every entry must be >= 8.0). Otherwise the visible GPUs'
    capabilities, and with no visible GPU DEFAULT_ARCH_LIST ('8.0;9.0a'). Compute capability 9.0
    becomes '9.0a': the wgmma/TMA conv (csrc/cuda/conv_wgmma.cuh) exists only in the sm_90a image, and
    sm_90a code runs on every 9.0 GPU (H100, H200, GH200). It does not run on later majors, which the
    plain '9.0' image does not either (no PTX is embedded unless the user asks for '+PTX').
    """
    env = os.environ if env is None else env
    user = env.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if user and user != "native":
        archs = [a for a in re.split(r"[;\s]+", user) if a]
        for arch in archs:
            if _parse_arch(arch) < MIN_ARCH:
                raise BuildConfigError(f"TORCH_CUDA_ARCH_LIST={user!r} contains {arch}: ahnet_fast's CUDA kernels "
                                       f"need compute capability >= {MIN_ARCH[0]}.{MIN_ARCH[1]}")
        return ";".join(archs)
    caps = sorted({tuple(c) for c in gpu_capabilities or [] if tuple(c) >= MIN_ARCH})
    if caps:
        return ";".join(f"{a}.{b}{'a' if (a, b) == (9, 0) else ''}" for a, b in caps)
    return DEFAULT_ARCH_LIST


def _mem_available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def resolve_max_jobs(env: Mapping[str, str] | None = None, mem_available: int | None = None,
                     cpus: int | None = None) -> tuple[int, str]:
    """(jobs, how it was chosen). A user's MAX_JOBS wins; otherwise min(cpus, free GiB / 2.5), >= 1."""
    env = os.environ if env is None else env
    if env.get("MAX_JOBS", "").strip():
        try:
            jobs = int(env["MAX_JOBS"])
        except ValueError:
            raise BuildConfigError(f"MAX_JOBS={env['MAX_JOBS']!r} is not an integer") from None
        if jobs < 1:
            raise BuildConfigError(f"MAX_JOBS={jobs} must be >= 1")
        return jobs, "MAX_JOBS set by the user"
    cpus = cpus or os.cpu_count() or 1
    if mem_available is None:
        return cpus, f"{cpus} cores (free memory unknown)"
    by_mem = max(1, int(mem_available / (GIB_PER_NVCC_JOB * 2**30)))
    jobs = max(1, min(cpus, by_mem))
    return jobs, f"{cpus} cores, {mem_available / 2**30:.1f} GiB free at ~{GIB_PER_NVCC_JOB} GiB per nvcc job"


def nvidia_include_dirs() -> list[str]:
    """Include folders of the CUDA library headers that pip's nvidia-* packages install.

    A system CUDA may hold only the compiler and runtime, while torch's headers reach for the library
    headers (cusparse.h, cublas_v2.h, cudnn.h) that ship in site-packages/nvidia/<lib>/include
    (nvidia/cu13/include for CUDA 13 wheels). Found by looking at the installed ``nvidia`` namespace
    package, never from a hard-coded path.
    """
    roots: list[str] = []
    spec = importlib.util.find_spec("nvidia")
    if spec is not None and spec.submodule_search_locations:
        roots.extend(spec.submodule_search_locations)
    dirs: list[str] = []
    for root in roots:
        for inc in sorted(glob.glob(os.path.join(root, "*", "include"))):
            if os.path.isdir(inc) and glob.glob(os.path.join(inc, "*.h")) and inc not in dirs:
                dirs.append(inc)
    return dirs


def csrc_sources() -> list[str]:
    """The extension's translation units (relative to the repo root): the defining .cpp, then the
    per-backend .cu files."""
    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp"), root_dir=ROOT))
    cu = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu"), root_dir=ROOT))
    return cpp + cu


def extra_compile_args(library_include_dirs: list[str] | None = None) -> dict[str, list[str]]:
    """Flags added on top of the ones torch's BuildExtension adds (csrc/check_compile.py adds those
    too). The library include folders go in as trailing -I so that nvcc's own CUDA headers, which
    torch puts first, win over a different CUDA version's headers in site-packages."""
    lib_inc = [f"-I{d}" for d in (nvidia_include_dirs() if library_include_dirs is None else library_include_dirs)]
    common = ["-O3", "-DNDEBUG"]
    # no --use_fast_math: the kernels must keep IEEE division and NaN propagation (torch semantics)
    nvcc = common + ["-lineinfo"] + lib_inc
    cxx = common + lib_inc
    return {"cxx": cxx, "nvcc": nvcc}


def build_metadata(facts: Mapping[str, Any], built: bool, reason: str, arch_list: str | None) -> dict[str, Any]:
    """What ahnet_fast._cuda checks before it loads the extension (and what `ahnet-fast info` shows)."""
    return {
        "cuda_extension": built,
        "reason": reason,
        "torch_version": facts.get("torch_version"),
        "torch_cuda": facts.get("torch_cuda"),
        "nvcc_version": facts.get("nvcc_version") if built else None,
        "cuda_arch_list": arch_list if built else None,
        "python": platform.python_version(),
        "build_date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _write_json_atomic(path: str, data: Mapping[str, Any]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=2, sort_keys=True)
        fh.write("\n")
    os.replace(tmp, path)


def _say(msg: str) -> None:
    print(f"ahnet_fast build: {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# setup()
# --------------------------------------------------------------------------------------------
def _main() -> None:
    from setuptools import find_packages, setup
    from setuptools.command.build_py import build_py

    mode = build_mode()
    facts = probe_toolchain()
    build_cuda, reason = decide_cuda_build(mode, facts)
    arch_list = None
    ext_modules: list[Any] = []
    cmdclass: dict[str, Any] = {}
    if build_cuda:
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension

        arch_list = resolve_arch_list(gpu_capabilities=facts["gpu_capabilities"])
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list  # read by torch's BuildExtension
        jobs, why = resolve_max_jobs(mem_available=_mem_available_bytes())
        os.environ["MAX_JOBS"] = str(jobs)
        lib_inc = nvidia_include_dirs()
        _say(f"building the CUDA extension {EXTENSION_NAME} with {reason}; TORCH_CUDA_ARCH_LIST={arch_list}; "
             f"MAX_JOBS={jobs} ({why}); library headers from {lib_inc or 'the CUDA toolkit only'}")
        ext_modules.append(CUDAExtension(
            name=EXTENSION_NAME,
            sources=csrc_sources(),
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args=extra_compile_args(lib_inc),
        ))
        cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=True)
    else:
        _say(f"CUDA extension not built ({reason}); the reference and triton backends are unaffected")

    metadata = build_metadata(facts, build_cuda, reason, arch_list)

    class BuildPyWithMetadata(build_py):
        """Also writes ahnet_fast/_build_info.json: into the build tree for a wheel, into the source
        tree for an editable install (where build_py itself copies nothing)."""

        def run(self) -> None:
            super().run()
            if self.editable_mode:
                target = os.path.join(ROOT, "ahnet_fast", BUILD_INFO_NAME)
            else:
                target = os.path.join(self.build_lib, "ahnet_fast", BUILD_INFO_NAME)
            _write_json_atomic(target, metadata)

    cmdclass["build_py"] = BuildPyWithMetadata
    setup(
        # kernels/ is a top-level source folder but is only ever installed as
        # ahnet_fast.kernels; nothing is installed as a top-level `kernels`.
        packages=find_packages(include=["ahnet_fast", "ahnet_fast.*"]) + ["ahnet_fast.kernels"],
        package_dir={"ahnet_fast.kernels": "kernels"},
        ext_modules=ext_modules,
        cmdclass=cmdclass,
    )


if __name__ == "__main__":
    _main()

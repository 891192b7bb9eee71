"""Compile every csrc/ translation unit with nvcc, as `pip install` would, without linking.

Used by CI on a machine without a GPU (and possibly with a CPU build of torch) to prove the sources
compile for sm_80 and sm_90a (the Hopper image, where the wgmma conv lives). The flags are those
setup.py gives the extension (imported from it, not copied) plus the ones torch's BuildExtension
adds itself (torch.utils.cpp_extension's
COMMON_NVCC_FLAGS, -std=c++20, -fPIC, -DTORCH_API_INCLUDE_EXTENSION_H, the extension name, the C++
ABI flag and the -gencode flags torch derives from TORCH_CUDA_ARCH_LIST).

A CPU build of torch lacks two cmake-generated CUDA headers (c10/cuda/impl/cuda_cmake_macros.h,
ATen/cuda/CUDAConfig.h), so point --torch-include at the include/ folder of a CUDA build of torch
(CI unpacks it from that build's wheel; nothing is installed).

    python csrc/check_compile.py [--torch-include DIR] [--archs "8.0;9.0a"] [--jobs N] [--out DIR]
"""
from __future__ import annotations

import argparse
import concurrent.futures
import importlib.util
import os
import shlex
import subprocess
import sys
import sysconfig
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_setup():
    spec = importlib.util.spec_from_file_location("ahnet_fast_setup", os.path.join(ROOT, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)  # the __main__ guard keeps setup() from running
    return module


def compile_commands(torch_include: str | None, archs: str, out_dir: str, nvcc: str) -> list[tuple[str, list[str]]]:
    """(source, argv) for every csrc translation unit."""
    import torch
    from torch.utils import cpp_extension

    setup_mod = _load_setup()
    archs = setup_mod.resolve_arch_list({"TORCH_CUDA_ARCH_LIST": archs})
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    gencode = cpp_extension._get_cuda_arch_flags()  # what BuildExtension adds for this arch list
    cuda_home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    if torch_include is None:
        torch_includes = cpp_extension.include_paths()
    else:
        torch_includes = [torch_include, os.path.join(torch_include, "torch", "csrc", "api", "include")]
    includes = ([os.path.join(ROOT, "csrc")] + torch_includes
                + [os.path.join(cuda_home, "include"), sysconfig.get_paths()["include"]])
    extra = setup_mod.extra_compile_args()
    defines = ["-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C",
               f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    inc = [f"-I{d}" for d in includes]
    commands = []
    for src in setup_mod.csrc_sources():
        obj = os.path.join(out_dir, os.path.basename(src) + ".o")
        path = os.path.join(ROOT, src)
        if src.endswith(".cu"):
            argv = ([nvcc, "-c", path, "-o", obj] + inc + cpp_extension.COMMON_NVCC_FLAGS
                    + ["--compiler-options", "-fPIC", "-std=c++20"] + defines + extra["nvcc"] + gencode)
        else:
            cxx = os.environ.get("CXX", "c++")
            argv = [cxx, "-c", path, "-o", obj] + inc + ["-fPIC", "-std=c++20"] + defines + extra["cxx"]
        commands.append((src, argv))
    return commands


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--torch-include", help="include/ folder of a CUDA build of torch (default: the installed torch)")
    parser.add_argument("--archs", default="8.0;9.0a", help="TORCH_CUDA_ARCH_LIST to compile for (default 8.0;9.0a)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--nvcc", default=os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc"))
    parser.add_argument("--out", help="folder for the object files (default: a temporary folder)")
    parser.add_argument("--only", nargs="*", default=None, help="compile only the sources whose path contains one of these")
    parser.add_argument("-v", "--verbose", action="store_true", help="print the command lines")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.nvcc):
        print(f"check_compile: nvcc not found at {args.nvcc} (set CUDA_HOME or pass --nvcc)", file=sys.stderr)
        return 2
    out_dir = args.out or tempfile.mkdtemp(prefix="ahnet_fast_cc_")
    os.makedirs(out_dir, exist_ok=True)
    commands = compile_commands(args.torch_include, args.archs, out_dir, args.nvcc)
    if args.only:
        commands = [(src, cmd) for src, cmd in commands if any(part in src for part in args.only)]
        if not commands:
            print(f"check_compile: no source matches {args.only}", file=sys.stderr)
            return 2

    def run(item: tuple[str, list[str]]) -> tuple[str, int, float, str]:
        src, cmd = item
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        return src, proc.returncode, time.perf_counter() - t0, proc.stdout + proc.stderr

    print(f"check_compile: {len(commands)} translation units, TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}, "
          f"{args.jobs} jobs", flush=True)
    if args.verbose:
        for _, cmd in commands:
            print("  " + shlex.join(cmd))
    failed = 0
    t_start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for src, rc, secs, log in pool.map(run, commands):
            print(f"  {'ok  ' if rc == 0 else 'FAIL'} {src} ({secs:.0f} s)", flush=True)
            if rc != 0 or (args.verbose and log.strip()):
                print(log, flush=True)
            failed += rc != 0
    print(f"check_compile: {len(commands) - failed}/{len(commands)} compiled in {time.perf_counter() - t_start:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

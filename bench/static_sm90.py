"""Static sm_90 / sm_80 report: what every kernel variant the launchers can pick compiles to.

No GPU is needed.  Three steps:

1. record (a subprocess under the Triton interpreter, nothing is executed): the launches of
   AHNet(psp_block_num=3, upsample_mode="trilinear") -- a training step (forward + backward) and
   an eval forward -- in bf16, fp16 and fp32 (IEEE, and TF32 when torch allows it) with a
   contiguous and a channels_last_3d input, plus
   direct ``conv3d_fused`` calls at the benchmark shapes of DESIGN.md (decoder 3x3x1 80->20 and
   1x1x3 20->20 pre-activation, encoder 3x3x1 64->64 conv->BN->ReLU, synthetic 3x3x1 / 1x1x3
   C->C for C in {64, 128, 256}), in both layouts.  The launchers choose tiles as on a GPU
   (``kernels._common.gpu_plans``) and every launch is reduced to Triton's compile key
   (``kernels.aot.KernelSpec``: constexprs, argument types, "== 1" / "% 16" specialisation,
   num_warps, num_stages).  The specs do not depend on the spatial size (the launchers do not
   specialise on it), so small volumes stand for the full-size ones.
2. compile every distinct spec for each architecture with Triton's own toolchain
   (``kernels.aot.compile_spec``), then read
     registers and spill bytes   ``ptxas -v`` on Triton's PTX (same ptxas and flags as Triton),
     shared memory               Triton's metadata (dynamic shared memory of the launch),
     SASS                        ``cuobjdump -sass`` of the cubin (the one shipped with Triton):
                                 HGMMA (wgmma) / HMMA (mma.sync) / FFMA counts, TMA (UTMALDG,
                                 UTMASTG, UBLKCP), widest global load (LDG, LDGSTS) and store
                                 (STG) in bits, instructions per MMA in the main loop (the
                                 backward-branch loop holding the most MMAs), and how many
                                 wgmma groups its waits leave in flight (WARPGROUP.DEPBAR.LE
                                 gsb0, 0xN: 1 = the MMA overlaps the next loads and prologue),
     wgmma serialization         ptxas's C7515 note (it then waits for every wgmma whatever the
                                 PTX asks).
3. the CUDA C++ conv kernels (csrc/cuda/conv_fused.cuh is torch-free): every instantiation the
   launcher in conv_fused.cu can pick, compiled with nvcc ``-cubin -Xptxas -v`` and the flags of
   setup.py, and the same SASS reading.  (batchnorm.cu / zmaxpool.cu need torch's CUDA headers
   and are covered by csrc/check_compile.py in CI, not here.)

Writes ``<out>/static_sm90.json`` (every record, the conv config table it covers, versions, the
commit it describes) and ``<out>/static_sm90.md``.

    python -m bench.static_sm90 [--out bench/results] [--archs 90 80] [--jobs 2]
"""
from __future__ import annotations

import argparse
import concurrent.futures
import datetime as _dt
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional

from ahnet_fast._atomic import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
SM90_SMEM_LIMIT = 232448        # bytes of shared memory per block on sm_90 (227 KB opt-in)
SM80_SMEM_LIMIT = 166912        # sm_80: 163 KB opt-in
SMEM_LIMITS = {90: SM90_SMEM_LIMIT, 80: SM80_SMEM_LIMIT}
# (dtype, TF32 allowed): fp32 convs compile differently when torch.backends.cuda.matmul.allow_tf32
DTYPES = (("bfloat16", False), ("float16", False), ("float32", False), ("float32", True))
MODEL = dict(psp_block_num=3, upsample_mode="trilinear")
MODEL_INPUT = (1, 1, 64, 64, 32)   # smallest valid input of that model (models/validation.py)


# ------------------------------------------------------------------------------------------------
# 1. recording (runs under TRITON_INTERPRET=1)
# ------------------------------------------------------------------------------------------------

def _conv_key(ints: dict, spec) -> Optional[dict]:
    """The conv_configs arguments of a recorded _conv_kernel launch."""
    if spec.kernel != "_conv_kernel":
        return None
    cx = dict(spec.constexprs)
    sig = dict(spec.signature)
    val = {**ints, **{k: v for k, v in cx.items() if isinstance(v, int)}}
    dtype = {"*bf16": "bfloat16", "*fp16": "float16", "*fp32": "float32"}[sig["x_ptr"]]
    return dict(Cin=val["Cin"], Cout=val["Cout"], KH=cx["KH"], KW=cx["KW"], KD=cx["KD"],
                stride=[val["STH"], val["STW"], val["STD"]], dtype=dtype, channels_last=cx["XV"] > 0,
                pool=cx["POOL"], has_pro=bool(cx["HAS_PRO"]), stats=bool(cx["STATS"]),
                has_res=bool(cx["HAS_RES"]), split=bool(cx.get("SPLIT", False)))


def _bench_convs(dtype, channels_last: bool):
    """Direct conv3d_fused calls at the benchmark shapes (small volumes: specs are size-free)."""
    import torch

    from ahnet_fast.kernels import conv3d_fused

    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format

    def t(*shape):
        return torch.empty(shape, dtype=dtype).to(memory_format=fmt)

    def vec(c):
        return torch.ones(c, dtype=torch.float32)

    cases = []
    # decoder, pre-activation BN+ReLU prologue (training: no epilogue; the statistics are the input's)
    for cin, cout, k, pad in ((80, 20, (3, 3, 1), (1, 1, 0)), (20, 20, (1, 1, 3), (0, 0, 1))):
        cases.append((f"decoder {k[0]}x{k[1]}x{k[2]} {cin}->{cout} pre-act", t(2, cin, 6, 6, 4),
                      torch.empty(cout, cin, *k, dtype=dtype), dict(padding=pad, in_scale=vec(cin), in_shift=vec(cin))))
    # encoder conv->BN->ReLU: eval (folded affine + ReLU epilogue) and training (statistics epilogue)
    w = torch.empty(64, 64, 3, 3, 1, dtype=dtype)
    cases.append(("encoder 3x3x1 64->64 eval", t(2, 64, 6, 6, 4), w,
                  dict(padding=(1, 1, 0), out_scale=vec(64), out_shift=vec(64), relu=True)))
    cases.append(("encoder 3x3x1 64->64 train", t(2, 64, 6, 6, 4), w, dict(padding=(1, 1, 0), compute_stats=True)))
    for c in (64, 128, 256):
        for k, pad in (((3, 3, 1), (1, 1, 0)), ((1, 1, 3), (0, 0, 1))):
            wk = torch.empty(c, c, *k, dtype=dtype)
            cases.append((f"synthetic {k[0]}x{k[1]}x{k[2]} {c}->{c} eval", t(1, c, 6, 6, 4), wk,
                          dict(padding=pad, out_scale=vec(c), out_shift=vec(c), relu=True)))
            cases.append((f"synthetic {k[0]}x{k[1]}x{k[2]} {c}->{c} pre-act", t(1, c, 6, 6, 4), wk,
                          dict(padding=pad, in_scale=vec(c), in_shift=vec(c))))
    for name, x, w, kw in cases:
        # weights channels_last_3d: the layout conv3d_fused runs with on a GPU (it converts others)
        w = w.contiguous(memory_format=torch.channels_last_3d)
        yield name, (lambda x=x, w=w, kw=kw: conv3d_fused(x, w, **kw))


def record() -> list[dict]:
    """Every launch of the recorded workloads: [{spec, ints, origin}], in order."""
    import torch

    import ahnet_fast
    from ahnet_fast import AHNet
    from ahnet_fast.kernels.aot import record_specs
    from ahnet_fast.ops._util import gpu_gradient_layouts

    out: list[dict] = []

    def keep(log, origin):
        for spec, _grid, ints in log.launches:
            out.append({"spec": spec.to_json(), "ints": ints, "origin": origin,
                        "conv_key": _conv_key(ints, spec)})

    for dname, tf32 in DTYPES:
        dtype = getattr(torch, dname)
        torch.backends.cuda.matmul.allow_tf32 = tf32
        dname = dname + ("+tf32" if tf32 else "")
        for cl in (False, True):
            layout = "channels_last_3d" if cl else "contiguous"
            torch.manual_seed(0)
            # conv weights channels_last_3d: the layout a model on a GPU has (FastAHNet)
            model = AHNet(**MODEL).to(dtype).use_gpu_weight_layout()
            x = torch.randn(*MODEL_INPUT, dtype=dtype)
            if cl:
                model = model.to(memory_format=torch.channels_last_3d)
                x = x.to(memory_format=torch.channels_last_3d)
            with ahnet_fast.use_backend("triton"):
                model.train()
                # gradients in the layouts cuDNN returns them in (a CPU's differ)
                with gpu_gradient_layouts(), record_specs() as log:
                    model(x).float().sum().backward()
                keep(log, f"AHNet psp3 trilinear train {dname} {layout}")
                model.eval()
                with torch.no_grad(), record_specs() as log:
                    model(x)
                keep(log, f"AHNet psp3 trilinear eval {dname} {layout}")
            for name, call in _bench_convs(dtype, cl):
                with record_specs() as log:
                    call()
                keep(log, f"{name} {dname} {layout}")
    return out


WAVE_INPUT = (1, 1, 192, 192, 64)   # the volume: deep layers have few output tiles


def wave_census() -> dict:
    """CTAs per conv launch of a bf16 channels-last eval forward at WAVE_INPUT, as the launchers
    plan it for a GPU of kernels.conv.DEFAULT_NUM_SMS SMs: with their split-K plan, and what the
    same convs would launch unsplit (P x N tiles).  Recorded, not run (runs under the interpreter)."""
    import torch

    import ahnet_fast
    from ahnet_fast import AHNet
    from ahnet_fast.kernels.aot import record_specs
    from ahnet_fast.kernels.conv import DEFAULT_NUM_SMS

    torch.manual_seed(0)
    model = AHNet(**MODEL).to(torch.bfloat16).use_gpu_weight_layout().to(memory_format=torch.channels_last_3d).eval()
    x = torch.randn(*WAVE_INPUT, dtype=torch.bfloat16).to(memory_format=torch.channels_last_3d)
    with ahnet_fast.use_backend("triton"), torch.no_grad(), record_specs() as log:
        model(x)
    convs = []
    for spec, grid, ints in log.launches:
        if spec.kernel != "_conv_kernel":
            continue
        cx = dict(spec.constexprs)
        tiles = grid[0] * grid[1]
        split = grid[2] if len(grid) > 2 else 1
        convs.append({"kernel": f"{cx['KH']}x{cx['KW']}x{cx['KD']}", "Cin": ints.get("Cin", cx.get("Cin")),
                      "Cout": ints.get("Cout", cx.get("Cout")), "tiles": tiles, "split": split,
                      "ctas": tiles * split})
    sms = DEFAULT_NUM_SMS
    return {"input": list(WAVE_INPUT), "sms": sms, "convs": len(convs),
            "under_a_wave_unsplit": sum(c["tiles"] < sms for c in convs),
            "under_a_wave_planned": sum(c["ctas"] < sms for c in convs),
            "split": sum(c["split"] > 1 for c in convs),
            "extra_launches": sum(1 for s, _, _ in log.launches if s.kernel == "_splitk_epilogue_kernel"),
            "launches": convs}


def record_in_subprocess() -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "bench.static_sm90", "--record-only"], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"recording failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])   # {"launches": [...], "waves": {...}}


# ------------------------------------------------------------------------------------------------
# 2. SASS / ptxas reading (shared by the Triton and the CUDA side)
# ------------------------------------------------------------------------------------------------

def triton_tool(name: str) -> str:
    """A CUDA binary tool shipped with Triton (ptxas, cuobjdump, nvdisasm), else the system's."""
    try:
        import triton
        path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
        if path.is_file():
            return str(path)
    except ImportError:
        pass
    found = shutil.which(name) or str(Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / name)
    return found


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_STACK = re.compile(r"(\d+) bytes stack frame")
_PTXAS_SMEM = re.compile(r"(\d+) bytes smem")
_PTXAS_FUNC = re.compile(r"Compiling entry function '([^']+)'|Function properties for (\S+)")


def parse_ptxas(log: str) -> dict[str, dict]:
    """Per-function registers / spills / static smem from a ``ptxas -v`` log."""
    out: dict[str, dict] = {}
    cur = None
    for line in log.splitlines():
        m = _PTXAS_FUNC.search(line)
        if m:
            cur = m.group(1) or m.group(2)
            out.setdefault(cur, {})
            continue
        if cur is None:
            continue
        d = out[cur]
        if (m := _PTXAS_SPILL.search(line)):
            d["spill_stores"] = int(m.group(1))
            d["spill_loads"] = int(m.group(2))
        if (m := _PTXAS_STACK.search(line)):
            d["stack"] = int(m.group(1))
        if (m := _PTXAS_REGS.search(line)):
            d["registers"] = int(m.group(1))
            if (m2 := _PTXAS_SMEM.search(line)):
                d["static_smem"] = int(m2.group(1))
    return out


_SASS_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_SASS_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_WIDTH_TOKENS = {"128": 128, "64": 64, "U16": 16, "S16": 16, "16": 16, "U8": 8, "S8": 8}


def _width(op: str) -> int:
    for tok in op.split(".")[1:]:
        if tok in _WIDTH_TOKENS:
            return _WIDTH_TOKENS[tok]
    return 32


def parse_sass(sass: str) -> dict[str, dict]:
    """Per-function SASS facts: MMA kind and counts, TMA, global access widths, main-loop cost."""
    funcs: dict[str, list] = {}
    labels: dict[str, dict[str, int]] = {}
    cur = None
    pending: list[str] = []
    for line in sass.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            cur = m.group(1)
            funcs[cur] = []
            labels[cur] = {}
            pending = []
            continue
        if cur is None:
            continue
        ml = _SASS_LABEL.match(line)
        if ml:
            pending.append(ml.group(1))
            continue
        mi = _SASS_INSTR.search(line)
        if mi:
            addr = int(mi.group(1), 16)
            for lab in pending:
                labels[cur][lab] = addr
            pending = []
            funcs[cur].append((addr, mi.group(3), mi.group(4)))
    out = {}
    for fn, ins in funcs.items():
        ops = [op for _, op, _ in ins]
        is_mma = [op.startswith(("HGMMA", "HMMA")) for op in ops]
        loads = [op for op in ops if op.startswith(("LDG", "LDGSTS"))]
        stores = [op for op in ops if op.startswith("STG")]
        loops = []
        for i, (addr, op, rest) in enumerate(ins):
            if op.startswith("BRA"):
                mt = re.search(r"(\.L_x_\d+)|0x([0-9a-f]+)", rest)
                if not mt:
                    continue
                target = labels[fn].get(mt.group(1)) if mt.group(1) else int(mt.group(2), 16)
                if target is not None and target <= addr:
                    j = next(k for k, (a, _, _) in enumerate(ins) if a >= target)
                    n_mma = sum(is_mma[j:i + 1])
                    if n_mma:
                        loops.append((n_mma, -(i + 1 - j), i + 1 - j, j, i))
        main = max(loops) if loops else None
        # wgmma groups a main-loop wait leaves in flight: WARPGROUP.DEPBAR.LE gsb0, 0xN waits until
        # at most N are pending; the smallest N in the loop (0: every MMA is waited for before
        # the next iteration's loads and prologue; 1: one MMA overlaps them)
        waits = ([int(m.group(1), 16) for _, op, rest in ins[main[3]:main[4] + 1] if op.startswith("WARPGROUP.DEPBAR")
                  for m in [re.search(r"gsb0,\s*0x([0-9a-f]+)", rest)] if m] if main else [])
        out[fn] = {
            "instructions": len(ins),
            "hgmma": sum(op.startswith("HGMMA") for op in ops),
            "hmma": sum(op.startswith("HMMA") for op in ops),
            "ffma": sum(op.startswith("FFMA") for op in ops),
            "tma": sum(op.startswith(("UTMALDG", "UTMASTG", "UBLKCP", "UTMAPF")) for op in ops),
            "ldgsts": sum(op.startswith("LDGSTS") for op in ops),
            "widest_load_bits": max((_width(op) for op in loads), default=0),
            "widest_store_bits": max((_width(op) for op in stores), default=0),
            "load_widths": _hist(_width(op) for op in loads),
            "store_widths": _hist(_width(op) for op in stores),
            "main_loop_instructions": main[2] if main else None,
            "main_loop_mma": main[0] if main else None,
            "main_loop_instr_per_mma": round(main[2] / main[0], 2) if main else None,
            "main_loop_wgmma_in_flight": min(waits) if waits else None,
        }
    return out


def _hist(values) -> dict[str, int]:
    h: dict[str, int] = defaultdict(int)
    for v in values:
        h[str(v)] += 1
    return dict(sorted(h.items(), key=lambda kv: -int(kv[0])))


def ptxas_for(arch: int) -> str:
    """The ptxas Triton itself runs for sm_<arch> (Triton 3.9 ships a CUDA 13 ptxas for sm_90+ and an
    older one for sm_80; earlier releases one for all)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        try:
            return get_ptxas(arch).path
        except TypeError:
            return get_ptxas().path
    except Exception:
        return triton_tool("ptxas")


def ptxas_version(arch: int = 90) -> str:
    try:
        out = subprocess.run([ptxas_for(arch), "--version"], capture_output=True, text=True).stdout
        return out.strip().splitlines()[-1]
    except Exception as exc:  # pragma: no cover - reported, not fatal
        return f"unknown ({exc})"


# ------------------------------------------------------------------------------------------------
# 3. Triton side: compile a spec and read it
# ------------------------------------------------------------------------------------------------

def analyse_triton(spec_json: dict, arch: int) -> dict:
    """Compile one KernelSpec for sm_<arch> and return its static facts (runs in a worker)."""
    from ahnet_fast.kernels.aot import KernelSpec, compile_spec

    spec = KernelSpec.from_json(spec_json)
    t0 = time.perf_counter()
    k = compile_spec(spec, arch)
    secs = time.perf_counter() - t0
    name = k.metadata.name
    rec: dict[str, Any] = {"arch": arch, "compile_s": round(secs, 2), "shared": int(k.metadata.shared),
                           "num_warps": spec.num_warps, "num_stages": spec.num_stages}
    gpu_name = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as d:
        ptx = Path(d) / "k.ptx"
        ptx.write_text(k.asm["ptx"])
        cub = Path(d) / "k.cubin"
        cub.write_bytes(k.asm["cubin"])
        # same ptxas and flags as Triton's make_cubin (so the numbers are those of its cubin)
        p = subprocess.run([ptxas_for(arch), "-lineinfo", "-v", "--regAllocOptLevel=2",
                            f"--gpu-name={gpu_name}", str(ptx), "-o", str(Path(d) / "v.cubin")],
                           capture_output=True, text=True)
        info = parse_ptxas(p.stdout + p.stderr).get(name, {})
        # ptxas C7515: "wgmma.mma_async instructions are serialized due to ...": every wgmma is
        # waited for at once, whatever wait_group the PTX asks for (the K loop loses its overlap)
        serialized = "C7515" in (p.stdout + p.stderr)
        sass = subprocess.run([triton_tool("cuobjdump"), "-sass", str(cub)], capture_output=True, text=True).stdout
    rec.update(registers=info.get("registers"), spill_stores=info.get("spill_stores", 0),
               spill_loads=info.get("spill_loads", 0), stack=info.get("stack", 0), wgmma_serialized=serialized)
    facts = parse_sass(sass)
    rec.update(facts.get(name) or next(iter(facts.values()), {}))
    return rec


# ------------------------------------------------------------------------------------------------
# 4. CUDA C++ side
# ------------------------------------------------------------------------------------------------

# (T, BM, BN, VEC_A) instantiations conv_fused.cu's launcher can pick (tile_shape(): 128x32 when
# Cout <= 32 else 64x64; vector_loads_ok() decides VEC_A at run time)
CUDA_CONV_VARIANTS = [(t, bm, bn, vec) for t in ("__nv_bfloat16", "__half", "float")
                      for bm, bn in ((128, 32), (64, 64)) for vec in ("true", "false")]
# ... and the sm_90a wgmma kernel's (conv_wgmma.cuh: 64 rows, wgmma_tile_n() picks BN, 16-bit only)
CUDA_WGMMA_VARIANTS = [(t, 64, bn, vec) for t in ("__nv_bfloat16", "__half")
                       for bn in (8, 24, 64, 80, 128) for vec in ("true", "false")]


def analyse_cuda(arch: int, nvcc: str) -> list[dict]:
    """Both CUDA conv kernels compiled as the build compiles them for `arch` (sm_90 means the sm_90a
    image: setup.py builds 9.0a for Hopper; the wgmma kernel exists only there)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("ahnet_fast_setup", ROOT / "setup.py")
    setup_mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup_mod)
    flags = setup_mod.extra_compile_args()["nvcc"]
    wgmma = arch == 90
    src = ['#include "cuda/conv_fused.cuh"', '#include "cuda/conv_wgmma.cuh"', "namespace ahnet_fast_cuda { namespace conv {"]
    src += [f"template __global__ void conv_fused_kernel<{t}, {bm}, {bn}, {v}>(const ConvParams);"
            for t, bm, bn, v in CUDA_CONV_VARIANTS]
    if wgmma:
        src += [f"template __global__ void hopper::conv_wgmma_kernel<{t}, {bn}, {v}>(const ConvParams, const __grid_constant__ CUtensorMap);"
                for t, _, bn, v in CUDA_WGMMA_VARIANTS]
    src += ["}}"]
    target = "90a" if arch == 90 else str(arch)
    with tempfile.TemporaryDirectory() as d:
        cu = Path(d) / "conv_fused_instances.cu"
        cu.write_text("\n".join(src) + "\n")
        cub = Path(d) / "k.cubin"
        cmd = [nvcc, "-cubin", "-std=c++17", f"-I{ROOT / 'csrc'}", *flags, "-Xptxas", "-v",
               f"-gencode=arch=compute_{target},code=sm_{target}", str(cu), "-o", str(cub)]
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"nvcc failed ({' '.join(cmd)}):\n{p.stderr[-3000:]}")
        secs = time.perf_counter() - t0
        ptxas = parse_ptxas(p.stdout + p.stderr)
        sass = subprocess.run([triton_tool("cuobjdump"), "-sass", str(cub)], capture_output=True, text=True).stdout
        smem = _cuda_smem(cub)
    facts = parse_sass(sass)
    out = []
    variants = [("conv_fused_kernel", v) for v in CUDA_CONV_VARIANTS]
    variants += [("conv_wgmma_kernel", v) for v in CUDA_WGMMA_VARIANTS] if wgmma else []
    for kernel, (t, bm, bn, v) in variants:
        name = next((n for n in facts if kernel in n and _cuda_matches(n, kernel, t, bm, bn, v)), None)
        if name is None:
            continue
        info = ptxas.get(name, {})
        # the wgmma kernel's shared memory is dynamic: the launch's request without the prologue vectors
        shared = (_wgmma_dynamic_smem(bn) if kernel == "conv_wgmma_kernel"
                  else smem.get(name, info.get("static_smem")))
        out.append({"kernel": kernel, "T": t, "BM": bm, "BN": bn, "VEC_A": v == "true",
                    "arch": arch, "target": f"sm_{target}", "mangled": name, "registers": info.get("registers"),
                    "spill_stores": info.get("spill_stores", 0), "spill_loads": info.get("spill_loads", 0),
                    "stack": info.get("stack", 0), "shared": shared,
                    "nvcc_s": round(secs, 1), **facts[name]})
    return out


def _wgmma_dynamic_smem(bn: int) -> int:
    """WgSmem<BN>::bytes(cin, false) of conv_wgmma.cuh: two A stages (64 x 128 B), two B stages (BN x
    128 B) or the fp32 epilogue tile, row coordinates and gather geometry, statistics scratch, two
    mbarriers, and 1024 B of alignment slack (+8 B per input channel with a BN prologue)."""
    stages = 2 * (64 * 128 + bn * 128)
    epilogue = 64 * (bn + 4) * 4
    return max(stages, epilogue) + 64 * (16 + 16 + 8) + 3 * 128 * 4 + 16 + 1024


_MANGLED_T = {"__nv_bfloat16": "13__nv_bfloat16", "__half": "6__half", "float": "f"}


def _cuda_matches(mangled: str, kernel: str, t: str, bm: int, bn: int, vec: str) -> bool:
    # _ZN...conv_fused_kernelI13__nv_bfloat16Li128ELi32ELb1EEEvNS0_10ConvParamsE
    # _ZN...6hopper17conv_wgmma_kernelI13__nv_bfloat16Li24ELb1EEEvNS0_10ConvParamsE14CUtensorMap_st
    b = 1 if vec == "true" else 0
    if kernel == "conv_wgmma_kernel":
        return f"conv_wgmma_kernelI{_MANGLED_T[t]}Li{bn}ELb{b}E" in mangled
    return f"conv_fused_kernelI{_MANGLED_T[t]}Li{bm}ELi{bn}ELb{b}E" in mangled


def _cuda_smem(cubin: Path) -> dict[str, int]:
    """Static shared memory per function from cuobjdump -res-usage."""
    out = subprocess.run([triton_tool("cuobjdump"), "-res-usage", str(cubin)], capture_output=True, text=True).stdout
    res, cur = {}, None
    for line in out.splitlines():
        m = re.search(r"Function (\S+):", line)
        if m:
            cur = m.group(1)
        m = re.search(r"SHARED:(\d+)", line)
        if m and cur:
            res[cur] = int(m.group(1))
    return res


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------

def conv_table(keys: list[dict]) -> list[dict]:
    """The config conv_configs gives each distinct recorded key (the table this report covers)."""
    import torch

    from ahnet_fast.kernels.conv import conv_configs

    rows = []
    for key in sorted({json.dumps(k, sort_keys=True) for k in keys}):
        k = json.loads(key)
        args = dict(k, dtype=getattr(torch, k["dtype"]), stride=tuple(k["stride"]))
        cfgs = conv_configs(**args)
        rows.append({"key": k, "configs": [dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
                                           for c in cfgs]})
    return rows


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except Exception:  # pragma: no cover
        return ""


def _label(spec: dict, layers: set) -> str:
    cx = dict(tuple(p) for p in spec["constexprs"])
    sig = dict(tuple(p) for p in spec["signature"])
    ptr = next(t for _, t in spec["signature"] if t.startswith("*"))[1:]
    if spec["kernel"] == "_conv_kernel":
        fl = [n for n in ("HAS_PRO", "HAS_BIAS", "HAS_OSC", "HAS_RES", "RELU", "STATS", "SPLIT") if cx.get(n)]
        if cx["POOL"]:
            fl.append("pool-before" if cx["POOL"] == 1 else "pool-after")
        # x:cl/8+pad: x read across its channel padding in whole vectors (XPAD)
        lay = (f"x:{'cl' if cx['XV'] else 'nc'}/{cx['XV']}{'+pad' if cx.get('XPAD') else ''} "
               f"o:{'cl' if cx['OV'] else 'nc'}/{cx['OV']}")
        tile = f"{cx['BLOCK_M']}x{cx['BLOCK_N']}x{cx['BLOCK_K']}"
        stride = "s2" if sig.get("STH") != "constexpr" else "s1"
        return (f"conv {cx['KH']}x{cx['KW']}x{cx['KD']} {stride} {ptr} {tile} {lay} "
                f"[{','.join(fl) or 'plain'}] ({', '.join(sorted(layers)[:4])}{', ...' if len(layers) > 4 else ''})")
    return f"{spec['kernel']} {ptr} " + " ".join(f"{k}={v}" for k, v in cx.items() if k not in ("I64",))


def build(out_dir: Path, archs: list[int], jobs: int, nvcc: Optional[str]) -> dict:
    t_start = time.perf_counter()
    recorded = record_in_subprocess()
    launches, waves = recorded["launches"], recorded["waves"]
    t_rec = time.perf_counter() - t_start
    specs: dict[str, dict] = {}
    layers: dict[str, set] = defaultdict(set)
    origins: dict[str, set] = defaultdict(set)
    for rec in launches:
        key = json.dumps(rec["spec"], sort_keys=True)
        specs[key] = rec["spec"]
        origins[key].add(rec["origin"])
        ck = rec["conv_key"]
        if ck:
            layers[key].add(f"{ck['Cin']}->{ck['Cout']}")
    keys = list(specs)
    print(f"static_sm90: {len(launches)} launches recorded in {t_rec:.0f} s, {len(keys)} distinct specs, "
          f"compiling for {archs} with {jobs} workers", flush=True)
    env_backup = os.environ.pop("TRITON_INTERPRET", None)
    triton_rows = []
    try:
        with concurrent.futures.ProcessPoolExecutor(max_workers=jobs) as pool:
            futs = {pool.submit(analyse_triton, specs[k], a): (k, a) for k in keys for a in archs}
            for i, fut in enumerate(concurrent.futures.as_completed(futs)):
                k, a = futs[fut]
                try:
                    r = fut.result()
                except Exception as exc:
                    r = {"arch": a, "error": f"{type(exc).__name__}: {exc}"[:2000]}
                r.update(spec=specs[k], label=_label(specs[k], layers[k]), layers=sorted(layers[k]),
                         origins=sorted(origins[k]))
                triton_rows.append(r)
                if (i + 1) % 25 == 0:
                    print(f"  {i + 1}/{len(futs)} compiled ({time.perf_counter() - t_start:.0f} s)", flush=True)
    finally:
        if env_backup is not None:
            os.environ["TRITON_INTERPRET"] = env_backup
    triton_rows.sort(key=lambda r: (r["spec"]["kernel"], r["label"], r["arch"]))
    cuda_rows: list[dict] = []
    cuda_note = None
    if nvcc and Path(nvcc).is_file():
        for a in archs:
            try:
                cuda_rows += analyse_cuda(a, nvcc)
            except Exception as exc:
                cuda_note = f"{type(exc).__name__}: {exc}"[:2000]
    else:
        cuda_note = "nvcc not found: CUDA C++ kernels not analysed"
    import torch
    import triton
    report = {
        "what": "static sm_90/sm_80 report of every kernel variant the launchers pick for AH-Net (bench/static_sm90.py)",
        "commit": _git("rev-parse", "HEAD"),
        # uncommitted changes that the recorded launches or the compiled code depend on
        "dirty": _git("status", "--porcelain", "--untracked-files=no", "--", "kernels", "csrc",
                      "ahnet_fast").splitlines(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "triton_version": triton.__version__, "torch": torch.__version__,
        "ptxas": {str(a): ptxas_version(a) for a in archs},
        "nvcc": (subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
                 if nvcc and Path(nvcc).is_file() else None),
        "sass_tool": "cuobjdump -sass (the copy shipped with Triton)",
        "archs": archs, "smem_limits": {str(a): SMEM_LIMITS[a] for a in archs},
        "model": dict(MODEL, input=list(MODEL_INPUT)),
        "recorded_launches": len(launches), "distinct_specs": len(keys),
        "conv_config_table": conv_table([r["conv_key"] for r in launches if r["conv_key"]]),
        "waves": waves,
        "triton": triton_rows, "cuda": cuda_rows, "cuda_note": cuda_note,
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    # compact JSON (the markdown is the readable form): the report stays under 2 MB; written
    # atomically so an interrupted run never leaves half a report beside the previous one
    atomic_write_text(out_dir / "static_sm90.json", json.dumps(report, separators=(",", ":")) + "\n")
    atomic_write_text(out_dir / "static_sm90.md", markdown(report))
    return report


def _violations(rows: list[dict]) -> list[str]:
    bad = []
    for r in rows:
        if "error" in r:
            bad.append(f"compile error sm_{r['arch']}: {r.get('label', '')}: {r['error'][:200]}")
            continue
        if r.get("spill_stores") or r.get("spill_loads"):
            bad.append(f"spill sm_{r['arch']}: {r.get('label', r.get('mangled'))}: {r['spill_stores']} B")
        lim = SMEM_LIMITS.get(r["arch"])
        if lim and (r.get("shared") or 0) > lim:
            bad.append(f"smem sm_{r['arch']}: {r.get('label', r.get('mangled'))}: {r['shared']} B")
    return bad


def markdown(rep: dict) -> str:
    L = [f"# Static sm_90 / sm_80 report (no GPU run)", "",
         f"Commit `{rep['commit'][:12]}`{' plus uncommitted changes (see `dirty` in the JSON)' if rep['dirty'] else ''}, "
         f"{rep['date']}, Triton {rep['triton_version']}, torch {rep['torch']}, ptxas "
         f"{'; '.join(f'sm_{a}: `{v}`' for a, v in rep['ptxas'].items())}, "
         f"nvcc `{rep['nvcc']}`. SASS from {rep['sass_tool']}.", "",
         f"{rep['recorded_launches']} launches recorded (AH-Net psp 3 trilinear train step + eval forward, "
         f"bf16/fp16/fp32, both layouts, plus the benchmark conv shapes), {rep['distinct_specs']} distinct "
         f"Triton compiles, each compiled for {', '.join('sm_%d' % a for a in rep['archs'])}.", ""]
    bad = _violations(rep["triton"]) + _violations(rep["cuda"])
    L += ["## Checks", "", f"- spills / shared memory over the limit / compile errors: "
          f"{'none' if not bad else len(bad)}"]
    L += [f"  - {b}" for b in bad[:50]]
    conv = [r for r in rep["triton"] if r["spec"]["kernel"] == "_conv_kernel" and "error" not in r]
    c16 = [r for r in conv if r["arch"] == 90 and "*fp32" not in {t for _, t in r["spec"]["signature"][:1]}]
    heads = [r for r in c16 if dict(map(tuple, r["spec"]["constexprs"]))["BLOCK_N"] < 16]
    c16 = [r for r in c16 if r not in heads]
    L += [f"- 16-bit conv variants on sm_90 using wgmma (HGMMA): "
          f"{sum(1 for r in c16 if r.get('hgmma'))}/{len(c16)}; small-head variants (Cout <= 4) on FMAs, "
          f"no MMA: {sum(1 for r in heads if not r.get('hgmma') and not r.get('hmma'))}/{len(heads)}"]
    L += [f"- of those wgmma variants, main loop keeps a wgmma in flight across iterations "
          f"(WARPGROUP.DEPBAR.LE gsb0, 0x1): {sum(1 for r in c16 if r.get('main_loop_wgmma_in_flight'))}/{len(c16)}; "
          f"serialized by ptxas (C7515): {sum(1 for r in c16 if r.get('wgmma_serialized'))}"]
    if conv:
        L += [f"- max registers {max(r['registers'] or 0 for r in conv)}, max shared memory "
              f"{max(r['shared'] for r in conv)} B (conv)"]
    w = rep.get("waves")
    if w:
        L += ["", f"## Waves: conv launches of a bf16 eval forward at {'x'.join(map(str, w['input']))} "
              f"on {w['sms']} SMs", "",
              f"- {w['convs']} conv launches; fewer CTAs than SMs: {w['under_a_wave_unsplit']} unsplit, "
              f"{w['under_a_wave_planned']} with the launcher's split-K plan ({w['split']} split, "
              f"{w['extra_launches']} reduction launches)",
              "", "| conv | launches | tiles | split | CTAs |", "|---|---|---|---|---|"]
        groups: dict = defaultdict(list)
        for c in w["launches"]:
            groups[(c["kernel"], c["Cin"], c["Cout"], c["tiles"], c["split"])].append(c)
        for (k, ci, co, tiles, split), cs in sorted(groups.items(), key=lambda kv: kv[0][3] * kv[0][4]):
            if tiles * split < w["sms"] or split > 1:
                L.append(f"| {k} {ci}->{co} | {len(cs)} | {tiles} | {split} | {tiles * split} |")
    L += ["", "## Triton conv kernel variants", "",
          "| variant (layers) | arch | warps/stages | regs | spill B | smem B | MMA | TMA | widest LDG/STG bits | "
          "loop instr/MMA | wgmma in flight |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in conv:
        mma = (f"HGMMA x{r['hgmma']}" if r.get("hgmma") else f"HMMA x{r['hmma']}" if r.get("hmma")
               else f"FFMA x{r.get('ffma', 0)}")
        fl = (("serialized (C7515)" if r.get("wgmma_serialized") else str(r.get("main_loop_wgmma_in_flight")))
              if r.get("hgmma") else "-")
        L.append(f"| {r['label']} | sm_{r['arch']} | {r['num_warps']}/{r['num_stages']} | {r['registers']} | "
                 f"{r['spill_stores']} | {r['shared']} | {mma} | {r.get('tma', 0)} | "
                 f"{r.get('widest_load_bits')}/{r.get('widest_store_bits')} | {r.get('main_loop_instr_per_mma')} | "
                 f"{fl} |")
    other = [r for r in rep["triton"] if r["spec"]["kernel"] != "_conv_kernel" and "error" not in r]
    L += ["", "## Triton BN / z-pool kernels", "",
          "| kernel | arch | regs | spill B | smem B | widest LDG/STG bits |", "|---|---|---|---|---|---|"]
    for r in other:
        L.append(f"| {r['label']} | sm_{r['arch']} | {r['registers']} | {r['spill_stores']} | {r['shared']} | "
                 f"{r.get('widest_load_bits')}/{r.get('widest_store_bits')} |")
    L += ["", "## CUDA C++ conv (csrc/cuda/conv_fused.cuh, nvcc -Xptxas -v)", ""]
    if rep.get("cuda_note"):
        L += [f"Note: {rep['cuda_note']}", ""]
    if rep.get("cuda_commit"):
        L += [f"CUDA section refreshed alone (`python -m bench.static_sm90 --cuda-only`) at commit "
              f"`{rep['cuda_commit'][:12]}`{' plus uncommitted changes' if rep.get('cuda_dirty') else ''}, "
              f"{rep.get('cuda_date')}; the Triton sections above are those of the commit in the title.", ""]
    L += ["conv_wgmma_kernel: sm_90a only (wgmma + TMA); smem is the dynamic request without the BN "
          "prologue's 8 B per input channel. loop instr/MMA counts SASS instructions per HGMMA "
          "(one HGMMA is a 64 x BN x 16 MMA of the whole warpgroup; one HMMA a 16 x 8 x 16 of one warp).", "",
          "| kernel | T | BM x BN | VEC_A | arch | regs | spill B | smem B | MMA | TMA | widest LDG/STG bits | loop instr/MMA |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rep["cuda"]:
        mma = (f"HGMMA x{r['hgmma']}" if r.get("hgmma") else f"HMMA x{r['hmma']}" if r.get("hmma")
               else f"FFMA x{r.get('ffma', 0)}")
        L.append(f"| {r.get('kernel', 'conv_fused_kernel')} | {r['T']} | {r['BM']}x{r['BN']} | {r['VEC_A']} | "
                 f"{r.get('target', 'sm_%d' % r['arch'])} | {r['registers']} | "
                 f"{r['spill_stores']} | {r['shared']} | {mma} | {r.get('tma', 0)} | {r.get('widest_load_bits')}/"
                 f"{r.get('widest_store_bits')} | {r.get('main_loop_instr_per_mma')} |")
    return "\n".join(L) + "\n"


def refresh_cuda(out_dir: Path, archs: list[int], nvcc: str) -> dict:
    """Recompile only the CUDA C++ section into the committed report (the Triton sections need a cold
    ~20-minute compile and do not change when only csrc/ does). Records the commit it describes."""
    path = out_dir / "static_sm90.json"
    if not path.is_file():
        raise SystemExit(f"static_sm90 --cuda-only: {path} does not exist; run the full report first")
    rep = json.loads(path.read_text())
    rows: list[dict] = []
    note = None
    for a in archs:
        try:
            rows += analyse_cuda(a, nvcc)
        except Exception as exc:
            note = f"{type(exc).__name__}: {exc}"[:2000]
    rep.update(cuda=rows, cuda_note=note, cuda_commit=_git("rev-parse", "HEAD"),
               cuda_dirty=_git("status", "--porcelain", "--untracked-files=no", "--", "csrc").splitlines(),
               cuda_date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
               nvcc=subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1])
    atomic_write_text(path, json.dumps(rep, separators=(",", ":")) + "\n")
    atomic_write_text(out_dir / "static_sm90.md", markdown(rep))
    return rep


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--archs", type=int, nargs="+", default=[90, 80])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--nvcc", default=shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc")
    ap.add_argument("--cuda-only", action="store_true",
                    help="recompile only the CUDA C++ section into the existing report (minutes, not ~20)")
    ap.add_argument("--record-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.record_only:
        print(json.dumps({"launches": record(), "waves": wave_census()}))
        return 0
    if args.cuda_only:
        rep = refresh_cuda(Path(args.out), args.archs, args.nvcc)
        bad = _violations(rep["cuda"])
        print(f"static_sm90 --cuda-only: {len(rep['cuda'])} CUDA records; {len(bad)} violations")
        for b in bad:
            print("  " + b)
        return 1 if bad else 0
    rep = build(Path(args.out), args.archs, args.jobs, args.nvcc)
    bad = _violations(rep["triton"]) + _violations(rep["cuda"])
    print(f"static_sm90: {len(rep['triton'])} Triton and {len(rep['cuda'])} CUDA records in {rep['seconds']} s; "
          f"{len(bad)} violations; wrote {args.out}/static_sm90.json and .md")
    for b in bad:
        print("  " + b)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

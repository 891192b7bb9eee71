"""Segment NIfTI files with a trained model: load -> normalise -> infer -> write like the input.

The image is loaded in network layout (:func:`ahnet_fast.data.nifti.load_volume`:
canonical orientation, coarsest axis last), normalised as in training, run
through sliding-window (or cascade) inference, and the labels (and optionally
class probabilities) are written with the input's affine, header and
orientation restored (:func:`ahnet_fast.data.nifti.save_all_like`: atomic, and labels and
probabilities of a case published together).

Intensity normalisation comes from the checkpoint's ``"intensity"`` entry (an
:class:`ahnet_fast.data.intensity.IntensityConfig` dict, written by training);
it can be overridden, and without either a percentile normalisation is used
with a warning. The mode and the statistics used are returned in
``SegmentResult.stats["intensity"]``.

Spacing: when the checkpoint records the training spacing
(:func:`ahnet_fast.data.spacing.training_spacing_from_meta`), each input is
resampled to it before inference and the probabilities are resampled back onto
the input's grid, where the labels are their argmax
(:mod:`ahnet_fast.data.spacing`); ``SegmentOptions.resample = False`` opts out.
What was done is in ``SegmentResult.stats["spacing"]``; spacings far from the
training spacing add lines to ``stats["warnings"]``.

Window and test-time mirroring follow the checkpoint too: a checkpoint written by
training records its 3D patch (``"patch_size"``), which is the window (the network
was trained on that context; on the MNI task a whole-volume window scored 0.02 mean
Dice lower), and its augmentation (``"augment"``), whose in-plane flips are the axes
mirrored at test time (:func:`checkpoint_window`, :func:`checkpoint_mirror_axes`).
"""
from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ahnet_fast.data.nifti import Volume, VolumeError, is_nifti_path, load_volume, save_all_like

from .cascade import cascade_inference
from .compiled import compile_seconds, maybe_compiled
from .sliding_window import sliding_window_inference

__all__ = [
    "InputOutputClash",
    "NonFiniteOutputError",
    "OutputError",
    "SegmentOptions",
    "SegmentResult",
    "check_outputs",
    "check_writable",
    "checkpoint_mirror_axes",
    "checkpoint_window",
    "intensity_from_meta",
    "predict_at_training_spacing",
    "predict_volume",
    "segment_file",
    "collect_inputs",
    "probabilities_path",
]

DEFAULT_WINDOW = (192, 192, 64)


class NonFiniteOutputError(RuntimeError):
    """The network's output holds NaN/Inf: no segmentation can be trusted."""


class OutputError(OSError):
    """An output cannot be written (full disk, read-only folder, ...); the message names the output."""


class InputOutputClash(ValueError):
    """An output would overwrite an input, or two cases would write the same output."""


@dataclass
class SegmentOptions:
    """Inference settings (see :func:`ahnet_fast.infer.sliding_window_inference`)."""

    window: Sequence[int] | None = DEFAULT_WINDOW
    overlap: float = 0.25
    blend: str = "gaussian"
    sw_batch_size: int = 1
    device: str = "cpu"  # where the model runs
    stitch_device: str = "cpu"  # where the whole-volume output is assembled
    bf16: bool = False
    progress: bool = False
    cascade: bool = False
    cascade_factor: int = 2
    cascade_margin: Sequence[int] = (16, 16, 4)
    nonfinite: str = "raise"
    # compiled CPU inference (ahnet_fast.infer.compiled): True forces it, False refuses it,
    # None (auto) uses it where it measured faster, which today is nowhere (see should_compile)
    compile: bool | None = None
    # spacing (ahnet_fast.data.spacing): resample each input to the training spacing (network layout,
    # mm along H, W, D) and the result back; None = not known (nothing is resampled, with a warning)
    resample: bool = True
    training_spacing: Sequence[float] | None = None
    # the training cases' own spacing when training resampled them to training_spacing (--spacing):
    # an input near it is not warned about as far from the training spacing
    source_spacing: Sequence[float] | None = None
    # test-time mirroring: spatial axes (0 = H, 1 = W, 2 = D) flipped, outputs averaged over every
    # combination (2**n passes per window); () = one pass
    mirror_axes: Sequence[int] = ()

    @classmethod
    def from_checkpoint(cls, meta: dict[str, Any], tta: bool | None = None, **kw: Any) -> "SegmentOptions":
        """Options for a checkpoint, as `ahnet-fast segment` chooses them.

        ``kw`` are fields set explicitly; ``window`` (absent or None) becomes the checkpoint's
        training patch (:func:`checkpoint_window`, else :data:`DEFAULT_WINDOW`); ``mirror_axes``
        (absent) follows ``tta``: None = the flips the checkpoint was trained with
        (:func:`checkpoint_mirror_axes`), True = those or H and W when it records none, False = none;
        ``training_spacing`` (absent or None) the spacing the checkpoint was trained at
        (:func:`~ahnet_fast.data.spacing.training_spacing_from_meta`), and ``source_spacing`` the training
        cases' own spacing when they were resampled to it.
        """
        from ahnet_fast.data.spacing import training_spacing_from_meta

        recorded = training_spacing_from_meta(meta)
        if kw.get("training_spacing") is None:
            kw["training_spacing"] = recorded
        if "source_spacing" not in kw and recorded is not None and tuple(kw["training_spacing"]) == recorded:
            kw["source_spacing"] = training_spacing_from_meta(meta, "resampled_from")
        if kw.get("window") is None:
            kw["window"] = checkpoint_window(meta) or DEFAULT_WINDOW
        if "mirror_axes" not in kw:
            kw["mirror_axes"] = () if tta is False else (checkpoint_mirror_axes(meta) or ((0, 1) if tta else ()))
        return cls(**kw)


def checkpoint_window(meta: dict[str, Any]) -> tuple[int, int, int] | None:
    """The sliding window a checkpoint implies: its 3D training patch (``"patch_size"``, written by
    training) or an explicit ``"window"``; None when it records neither."""
    for key in ("patch_size", "window"):
        v = meta.get(key)
        if v is not None and len(v) == 3:
            return tuple(int(x) for x in v)  # type: ignore[return-value]
    return None


def checkpoint_mirror_axes(meta: dict[str, Any]) -> tuple[int, ...]:
    """The in-plane axes the checkpoint's training mirrored (``"augment"``: ``flip_axes`` when
    augmentation was enabled): a model trained so is mirror-invariant along them, so test-time
    mirroring averages out its errors there. ``()`` when the checkpoint does not record it."""
    aug = meta.get("augment")
    if not isinstance(aug, dict) or not aug.get("enabled", True):
        return ()
    return tuple(sorted(int(a) for a in aug.get("flip_axes", ())))


@dataclass
class SegmentResult:
    """Labels ``(H, W, D)`` and probabilities ``(H, W, D, K)`` in network layout, and timings."""

    labels: np.ndarray
    probabilities: np.ndarray
    seconds: float
    stats: dict[str, Any] = field(default_factory=dict)


def intensity_from_meta(meta: dict[str, Any], override: Any = None):
    """The :class:`IntensityConfig` to use: ``override``, else the checkpoint's, else percentile (warned)."""
    from ahnet_fast.data.intensity import IntensityConfig

    if override is not None:
        return override if isinstance(override, IntensityConfig) else IntensityConfig.from_dict(dict(override))
    for holder in (meta, meta.get("preprocessing") or {}, meta.get("data_config") or {}, meta.get("config") or {}):
        cfg = holder.get("intensity") if isinstance(holder, dict) else None
        if isinstance(cfg, IntensityConfig):
            return cfg
        if isinstance(cfg, dict):
            return IntensityConfig.from_dict(cfg)
    warnings.warn(
        "the checkpoint does not record its intensity normalisation ('intensity'); using percentile "
        "scaling (0.5-99.5); pass the training setting explicitly if it was a CT window",
        stacklevel=2,
    )
    return IntensityConfig(mode="percentile")


def predict_volume(image: np.ndarray, model: nn.Module, opts: SegmentOptions) -> SegmentResult:
    """Run ``model`` over a normalised ``(H, W, D)`` image.

    Returns labels (uint8/int16 argmax, or ``p > 0.5`` for a 1-channel model)
    and probabilities (softmax, or sigmoid for 1 channel) in network layout.
    """
    in_ch = getattr(getattr(model, "input_spec", None), "in_channels", 1)
    if in_ch != 1:
        raise ValueError(f"the model takes {in_ch} input channels; segment handles single-channel images only")
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    kw: dict[str, Any] = dict(
        window=opts.window, overlap=opts.overlap, blend=opts.blend, sw_batch_size=opts.sw_batch_size,
        sw_device=opts.device, device=opts.stitch_device,
        autocast_dtype=torch.bfloat16 if opts.bf16 else None, progress=opts.progress,
        mirror_axes=tuple(opts.mirror_axes),
    )
    # compiled once per process and model, then reused for every window and volume
    net = maybe_compiled(model, opts.device, enabled=opts.compile, autocast_dtype=kw["autocast_dtype"])
    t0 = time.perf_counter()
    stats: dict[str, Any] = {}
    if opts.cascade:
        logits, cs = cascade_inference(x, net, factor=opts.cascade_factor, margin=opts.cascade_margin, **kw)
        stats = {"roi": cs.roi, "pass2_fraction": cs.pass2_fraction,
                 "time_pass1": cs.time_pass1, "time_pass2": cs.time_pass2}
    else:
        logits = sliding_window_inference(x, net, **kw)
    if net is not model:
        stats["compile_seconds"] = compile_seconds(model)  # reported apart from inference time
    logits = logits[0].float().cpu()
    bad = int((~torch.isfinite(logits)).sum())
    if bad:
        # argmax over NaN is silently class 0 everywhere: an all-background "result"
        raise NonFiniteOutputError(
            f"the model produced {bad} NaN/Inf logits of {logits.numel()}"
            + (" under --bf16 (try without it)" if opts.bf16 else "")
            + "; the checkpoint's weights or the input's intensities are out of range"
        )
    prob = torch.sigmoid(logits) if logits.shape[0] == 1 else torch.softmax(logits, dim=0)
    labels = _labels(prob)
    seconds = time.perf_counter() - t0
    return SegmentResult(labels.numpy(), prob.permute(1, 2, 3, 0).contiguous().numpy(), seconds, stats)


def predict_at_training_spacing(image: np.ndarray, spacing: Sequence[float], model: nn.Module,
                                opts: SegmentOptions) -> SegmentResult:
    """:func:`predict_volume` on the grid the model was trained at: a normalised ``(H, W, D)`` image of
    voxel size ``spacing`` (mm, network layout) is resampled to ``opts.training_spacing`` (unless
    ``opts.resample`` is False or the spacings agree), segmented, and its probabilities resampled back.

    Returns labels and probabilities on the image's own grid; ``stats`` adds ``spacing`` (one line
    saying what was done), ``warnings`` (spacings far from the training spacing, or an unknown one),
    ``resampled``, ``input_spacing`` and ``model_grid``.
    """
    from ahnet_fast.data.spacing import plan_resampling, resample_image, resample_probabilities

    plan = plan_resampling(spacing, image.shape, opts.training_spacing, resample=opts.resample,
                           source_spacing=opts.source_spacing)
    t0 = time.perf_counter()
    res = predict_volume(resample_image(image, plan), model, opts)
    if plan.active:
        prob = resample_probabilities(res.probabilities, plan)
        labels = _labels(torch.from_numpy(prob).permute(3, 0, 1, 2)).numpy()
        res = SegmentResult(labels, prob, time.perf_counter() - t0, res.stats)
    res.stats.update(spacing=plan.message, warnings=list(plan.warnings), resampled=plan.active,
                     input_spacing=plan.input_spacing, model_grid=plan.target_shape)
    return res


def _labels(prob: torch.Tensor) -> torch.Tensor:
    """Labels from ``(K, H, W, D)`` probabilities: ``p > 0.5`` for one channel, else the argmax."""
    if prob.shape[0] == 1:
        return (prob[0] > 0.5).to(torch.uint8)
    return prob.argmax(dim=0).to(torch.uint8 if prob.shape[0] <= 256 else torch.int16)


def probabilities_path(label_path: str | os.PathLike) -> Path:
    """``case.nii.gz`` -> ``case_probabilities.nii.gz`` (same folder)."""
    p = Path(label_path)
    name = p.name
    suffix = ".nii.gz" if name.lower().endswith(".nii.gz") else ".nii"
    return p.with_name(name[: -len(suffix)] + "_probabilities" + suffix)


def segment_file(
    in_path: str | os.PathLike,
    out_path: str | os.PathLike,
    model: nn.Module,
    intensity: Any,
    opts: SegmentOptions,
    probabilities: bool = False,
    warn: bool = True,
) -> SegmentResult:
    """Segment one file and write the result(s) on the input's grid (atomically).

    The image is normalised (statistics in ``stats["intensity"]``), resampled to
    ``opts.training_spacing`` unless ``opts.resample`` is False (what was done in
    ``stats["spacing"]``), segmented, and labels and probabilities are brought back
    onto the input's grid. Lines about spacings far from the training spacing (or an
    unknown one) are in ``stats["warnings"]`` and, with ``warn``, also issued as
    Python warnings.

    Everything is computed before anything is written, so a failure (bad
    input, out of memory) leaves no output behind; labels and probabilities are
    published together (:func:`ahnet_fast._atomic.atomic_group`: labels last, so
    existing labels always sit beside their own probabilities). A write failure
    raises :class:`OutputError` naming the output.
    """
    from ahnet_fast.data.intensity import normalise_with_stats

    vol: Volume = load_volume(in_path, nonfinite=opts.nonfinite)  # type: ignore[arg-type]
    image, norm_stats = normalise_with_stats(vol.array, intensity, where=str(in_path))
    res = predict_at_training_spacing(image, vol.spacing, model, opts)
    if warn:
        for line in res.stats["warnings"]:
            warnings.warn(f"{in_path}: {line}", stacklevel=2)
    res.stats.update(intensity=norm_stats)
    items = [(res.labels, out_path, res.labels.dtype)]
    if probabilities:
        # labels last: they are the marker that the case's pair of files is complete
        items.insert(0, (res.probabilities, probabilities_path(out_path), np.dtype(np.float32)))
    try:
        save_all_like(items, vol)
    except OSError as exc:  # ENOSPC, EROFS, EACCES: the output is at fault, not the input
        reason = exc.strerror or str(exc)
        raise OutputError(f"{out_path}: cannot write the output ({reason}); nothing was written for {in_path}") \
            from exc
    return res


def _file_id(path: str | os.PathLike) -> tuple[int, int] | None:
    """(device, inode): equal for one file reached through hard or symbolic links."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def check_outputs(pairs: Sequence[tuple[str, Path]], probabilities: bool = False) -> None:
    """Refuse a list of ``(input, output)`` pairs that would lose data, before anything runs.

    Raises :class:`InputOutputClash` when an output (or, with ``probabilities``, its
    ``*_probabilities`` file) is one of the inputs, by path or as the same file reached
    through a link, or when two cases would write the same output file.
    """
    inputs = {os.path.realpath(src): src for src, _ in pairs}
    by_id = {fid: src for src, _ in pairs if (fid := _file_id(src)) is not None}
    owner: dict[str, str] = {}
    for src, dst in pairs:
        outs = [Path(dst)] + ([probabilities_path(dst)] if probabilities else [])
        for out in outs:
            real = os.path.realpath(out)
            hit = inputs.get(real)
            if hit is None:
                fid = _file_id(out)  # an existing output that is an input under another name
                hit = by_id.get(fid) if fid is not None else None
            if hit is not None:
                raise InputOutputClash(
                    f"{out}: output would overwrite the input {hit}; choose an output file or folder that "
                    "holds none of the inputs"
                )
            if real in owner and owner[real] != src:
                raise InputOutputClash(
                    f"{out}: both {owner[real]} and {src} would be written to this output (same file name); "
                    "segment them into separate folders or rename one"
                )
            owner[real] = src


def check_writable(folder: str | os.PathLike) -> None:
    """Raise :class:`OutputError` if no file can be created in ``folder`` (checked before inference)."""
    import tempfile

    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise OutputError(f"{folder}: output folder is not writable ({exc.strerror or exc})") from exc


def _nnunet_stem(name: str) -> str | None:
    """``case_0000.nii.gz`` -> ``case.nii.gz``; None for a name without nnU-Net's channel suffix."""
    from ahnet_fast.data.dataset import NNUNET_CHANNEL

    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            stem = name[: -len(suffix)]
            if stem.endswith(NNUNET_CHANNEL) and len(stem) > len(NNUNET_CHANNEL):
                return stem[: -len(NNUNET_CHANNEL)] + name[len(stem):]
    return None


def collect_inputs(
    source: str | os.PathLike, out: str | os.PathLike, split: str = "test", probabilities: bool = False
) -> list[tuple[str, Path]]:
    """Pairs ``(input file, output file)`` for a file, a folder of NIfTI files, or a dataset.json.

    * file: ``out`` is the output file (must end in .nii/.nii.gz; its folder is created);
    * folder: every ``*.nii``/``*.nii.gz`` in it (not recursive) -> ``out/<same name>``;
    * ``*.json``: the ``split`` list (``test``, ``validation`` or ``training``) of a
      Medical Segmentation Decathlon or nnU-Net v2 dataset.json -> ``out/<image name>``.
    When every input is named like nnU-Net's images (``<case>_0000.nii.gz``) the outputs are
    named like its labels (``out/<case>.nii.gz``).
    Output folders are created. Lists that would overwrite an input or write two cases to
    one file are refused (:func:`check_outputs`; ``probabilities``: the
    ``*_probabilities`` outputs are checked too).
    """
    src, out = Path(source), Path(out)
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such file or folder")
    if src.is_file() and src.suffix.lower() == ".json":
        from ahnet_fast.data.dataset import read_dataset

        spec = read_dataset(src)
        if split not in ("test", "validation", "training"):
            raise ValueError(f"split must be 'test', 'validation' or 'training', got {split!r}")
        refs = getattr(spec, split)
        if not refs:
            avail = [s for s in ("test", "validation", "training") if getattr(spec, s)]
            raise VolumeError(f"{src}: the {split!r} list is empty or missing (non-empty: {avail})")
        files = [r.image for r in refs]
    elif src.is_dir():
        # hidden files are never inputs: temporaries of interrupted writes (ours and other tools')
        files = sorted(str(p) for p in src.iterdir()
                       if p.is_file() and is_nifti_path(p) and not p.name.startswith("."))
        if not files:
            raise VolumeError(f"{src}: folder holds no .nii/.nii.gz files")
    else:
        if not is_nifti_path(out):
            raise VolumeError(f"{out}: output for a single input file must end in .nii or .nii.gz")
        if out.parent.exists() and not out.parent.is_dir():
            raise VolumeError(f"{out}: {out.parent} is a file, not a folder")
        pairs = [(str(src), out)]
        check_outputs(pairs, probabilities)
        out.parent.mkdir(parents=True, exist_ok=True)  # as for folder outputs
        return pairs
    if out.exists() and not out.is_dir():
        raise VolumeError(f"{out}: must be a folder when the input is a folder or a dataset.json")
    pairs = []
    # nnU-Net's single-channel images are named <case>_0000.nii.gz and its labels <case>.nii.gz:
    # when every input is so named, the outputs take the label names (as nnU-Net's own predictions do)
    strip = all(_nnunet_stem(Path(f).name) is not None for f in files)
    for f in files:
        name = Path(f).name
        if not is_nifti_path(name):
            name = name.rsplit(".", 1)[0] + ".nii.gz"
        if strip:
            name = str(_nnunet_stem(name))
        pairs.append((f, out / name))
    check_outputs(pairs, probabilities)  # before the folder is created: a refused run changes nothing
    out.mkdir(parents=True, exist_ok=True)
    return pairs

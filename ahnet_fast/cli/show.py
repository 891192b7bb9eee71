"""`ahnet-fast show IMAGE [--seg SEG] --out PNG`: axial, coronal and sagittal slices with an overlay.

Each label value always gets the same colour (:func:`label_colours`: saturated hues, none grey,
so every class stands out on a greyscale image), the legend names the classes (dataset.json or a
checkpoint), the title names image and segmentation with their folders, and ``--slice`` /
``--center-on LABELS`` put two renderings through the same voxel so they can be compared.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from ahnet_fast._atomic import atomic_path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "show",
        help="render axial/coronal/sagittal slices (with a segmentation overlay) to a PNG",
        description=(
            "Render three orthogonal slices of IMAGE in canonical (RAS) orientation, with the label map SEG "
            "overlaid in colour (one fixed colour per label, named in the legend from a dataset.json near SEG or "
            "IMAGE, or --classes). Slices pass through --slice, else the foreground centre of --center-on, else "
            "of SEG, else the volume centre; the slices used are printed, so another rendering can reuse them."
        ),
    )
    p.add_argument("image", metavar="IMAGE", help="NIfTI image")
    p.add_argument("--seg", default=None, help="label map on the same grid as IMAGE")
    p.add_argument("--out", required=True, help="output .png")
    p.add_argument("--slice", type=int, nargs=3, metavar=("X", "Y", "Z"), default=None,
                   help="voxel indices (canonical RAS order) of the slices to show")
    p.add_argument("--center-on", metavar="LABELS", default=None,
                   help="label map on IMAGE's grid whose foreground centre the slices pass through (e.g. the "
                        "ground truth, to compare a prediction's rendering with the truth's)")
    p.add_argument("--classes", metavar="FILE", default=None,
                   help="class names from this dataset.json or checkpoint (default: a dataset.json in the folder "
                        "of SEG or IMAGE, or their parent)")
    p.add_argument("--alpha", type=float, default=0.45, help="overlay opacity (default 0.45)")
    p.add_argument("--dpi", type=int, default=110)
    p.set_defaults(func=run)


#: the first colours, chosen to stand out on grey: saturated, bright, none grey, brown or black
_BASE_COLOURS = ["#ff0000", "#00e000", "#0050ff", "#ffe000", "#ff00ff", "#00e5ff", "#ff8000", "#8c00ff",
                 "#00ff90", "#ff0080", "#80ff00", "#0090ff"]


def label_colours(n: int) -> list[tuple[float, float, float]]:
    """RGB colours of labels 1..n (index 0 is label 1): a fixed list, then evenly spread saturated hues.

    Label ``i`` gets the same colour in every rendering whatever the other labels are, and every
    colour has HSV saturation and value >= 0.8 (so none is grey on a greyscale image).
    """
    import colorsys

    from matplotlib.colors import to_rgb

    out = [to_rgb(c) for c in _BASE_COLOURS[:n]]
    golden = 0.618033988749895
    i = 0
    while len(out) < n:
        h = (0.05 + i * golden) % 1.0
        out.append(colorsys.hsv_to_rgb(h, 1.0 if i % 2 == 0 else 0.85, 1.0))
        i += 1
    return out


def foreground_centre(labels: np.ndarray) -> list[int] | None:
    """Voxel ``(x, y, z)`` at the mean of the non-zero voxels, or None when there are none."""
    if labels is None or not (labels > 0).any():
        return None
    return [int(round(c.mean())) for c in np.nonzero(labels > 0)]


def render(
    image: np.ndarray,
    spacing: Sequence[float],
    seg: np.ndarray | None,
    out: str | os.PathLike,
    center: Sequence[int] | None = None,
    alpha: float = 0.45,
    dpi: int = 110,
    title: str = "",
    names: dict[int, str] | None = None,
) -> Path:
    """Write a PNG of three orthogonal slices.

    Args:
        image: ``(X, Y, Z)`` in canonical RAS orientation (axis 0 points right, 1 anterior, 2 superior).
        spacing: mm per voxel along X, Y, Z (sets the aspect ratio of each panel).
        seg: ``(X, Y, Z)`` integer labels (0 = background, not drawn) or None.
        out: ``.png`` path, written atomically.
        center: voxel ``(x, y, z)`` the slices pass through (default: foreground centre or volume centre).
        names: label value -> class name for the legend (default ``label N``).
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    out = Path(out)
    if out.suffix.lower() != ".png":
        raise ValueError(f"{out}: output must be a .png file")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"{out}: output folder {out.parent} does not exist")
    if center is None:
        center = foreground_centre(seg) if seg is not None else None
        if center is None:
            center = [s // 2 for s in image.shape]
    center = [min(max(0, int(c)), s - 1) for c, s in zip(center, image.shape)]
    lo, hi = np.percentile(image, [1, 99])
    if hi <= lo:
        hi = lo + 1.0
    sx, sy, sz = (float(s) for s in spacing)
    x, y, z = center
    # (name, 2D slice with first index horizontal, second vertical, aspect = vertical/horizontal mm,
    #  axis labels)
    panels = [
        (f"axial z={z}", np.s_[:, :, z], sy / sx, ("R", "A")),
        (f"coronal y={y}", np.s_[:, y, :], sz / sx, ("R", "S")),
        (f"sagittal x={x}", np.s_[x, :, :], sz / sy, ("A", "S")),
    ]
    names = dict(names or {})
    n_labels = int(seg.max()) if seg is not None and seg.size else 0
    n_colours = max([n_labels, 1, *[k for k in names if k > 0]])
    colours = label_colours(n_colours)
    # label i -> colour i-1 with a fixed scale: the same label has the same colour in every rendering
    cmap = ListedColormap(colours)
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.8))
    for ax, (name, sl, aspect, (right, up)) in zip(axes, panels):
        # transpose so the first index runs left->right and the second bottom->top (origin lower)
        ax.imshow(image[sl].T, cmap="gray", vmin=lo, vmax=hi, origin="lower", aspect=aspect,
                  interpolation="nearest")
        if seg is not None:
            s = seg[sl].T
            ax.imshow(np.ma.masked_where(s <= 0, s - 1), cmap=cmap, vmin=-0.5, vmax=n_colours - 0.5,
                      alpha=alpha, origin="lower", aspect=aspect, interpolation="nearest")
        ax.set_title(name)
        ax.set_xlabel(f"-> {right}")
        ax.set_ylabel(f"-> {up}")
        ax.set_xticks([])
        ax.set_yticks([])
    present = sorted(int(v) for v in np.unique(seg) if v > 0) if seg is not None else []
    if present:
        from matplotlib.patches import Patch

        fig.legend(handles=[Patch(color=colours[i - 1], label=f"{i} {names[i]}" if i in names else f"label {i}")
                            for i in present],
                   loc="lower center", ncol=min(len(present), 6), frameon=False)
    if title:
        fig.suptitle(title)
    rows = -(-len(present) // 6) if present else 0
    fig.tight_layout(rect=(0, 0.06 * rows, 1, 1))
    try:
        with atomic_path(out, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=dpi, format="png")
    finally:
        plt.close(fig)
    return out


def display_name(path: str | os.PathLike) -> str:
    """``folder/file.nii.gz``: the file with its folder, so two files of one name stay apart."""
    p = Path(path).resolve()
    return f"{p.parent.name}/{p.name}" if p.parent.name else p.name


def make_title(image: str | os.PathLike, seg: str | os.PathLike | None) -> str:
    """``image: a/x.nii.gz | segmentation: b/x.nii.gz`` (more of the path where those coincide)."""
    a = display_name(image)
    if seg is None:
        return f"image: {a}"
    b = display_name(seg)
    if a == b and Path(image).resolve() != Path(seg).resolve():
        a, b = str(Path(image).resolve()), str(Path(seg).resolve())
    return f"image: {a} | segmentation: {b}"


def run(args: argparse.Namespace) -> int:
    from ahnet_fast.data.nifti import load_label, load_volume
    from ahnet_fast.infer.evaluate import class_names_from, find_class_names

    try:
        vol = load_volume(args.image, nonfinite="zero")
        seg = load_label(args.seg, vol) if args.seg else None
        inv = tuple(int(i) for i in np.argsort(vol.perm))  # network layout -> canonical RAS
        image = vol.array.transpose(inv)
        spacing = [vol.spacing[i] for i in inv]
        seg_c = seg.transpose(inv) if seg is not None else None
        center = args.slice
        if center is None and args.center_on:
            ref = load_label(args.center_on, vol).transpose(inv)
            center = foreground_centre(ref)
            if center is None:
                raise ValueError(f"--center-on {args.center_on}: no foreground voxel to centre on")
        if center is None:
            center = (foreground_centre(seg_c) if seg_c is not None else None) or [s // 2 for s in image.shape]
        center = [min(max(0, int(c)), s - 1) for c, s in zip(center, image.shape)]
        if args.classes:
            names = class_names_from(args.classes)
        else:
            names, _ = find_class_names(*[p for p in (args.seg, args.image) if p])
        render(image, spacing, seg_c, args.out, center=center, alpha=args.alpha, dpi=args.dpi,
               title=make_title(args.image, args.seg), names=names)
    except (OSError, ValueError) as exc:
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"ahnet-fast: error: {text}", file=sys.stderr)
        return 1
    x, y, z = center
    print(f"wrote {args.out} (slices x={x} y={y} z={z}; --slice {x} {y} {z} shows the same ones)")
    return 0

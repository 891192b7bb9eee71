"""`ahnet-fast show IMAGE [--seg SEG] --out PNG`: axial, coronal and sagittal slices with an overlay."""
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
            "overlaid in colour. Slices pass through the centre of the foreground of SEG (or the volume centre)."
        ),
    )
    p.add_argument("image", metavar="IMAGE", help="NIfTI image")
    p.add_argument("--seg", default=None, help="label map on the same grid as IMAGE")
    p.add_argument("--out", required=True, help="output .png")
    p.add_argument("--slice", type=int, nargs=3, metavar=("X", "Y", "Z"), default=None,
                   help="voxel indices (canonical RAS order) of the slices to show")
    p.add_argument("--alpha", type=float, default=0.45, help="overlay opacity (default 0.45)")
    p.add_argument("--dpi", type=int, default=110)
    p.set_defaults(func=run)


def render(
    image: np.ndarray,
    spacing: Sequence[float],
    seg: np.ndarray | None,
    out: str | os.PathLike,
    center: Sequence[int] | None = None,
    alpha: float = 0.45,
    dpi: int = 110,
    title: str = "",
) -> Path:
    """Write a PNG of three orthogonal slices.

    Args:
        image: ``(X, Y, Z)`` in canonical RAS orientation (axis 0 points right, 1 anterior, 2 superior).
        spacing: mm per voxel along X, Y, Z (sets the aspect ratio of each panel).
        seg: ``(X, Y, Z)`` integer labels (0 = background, not drawn) or None.
        out: ``.png`` path, written atomically.
        center: voxel ``(x, y, z)`` the slices pass through (default: foreground centre or volume centre).
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
        if seg is not None and (seg > 0).any():
            center = [int(round(c.mean())) for c in np.nonzero(seg > 0)]
        else:
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
    colours = plt.get_cmap("tab10")(np.arange(10))
    n_labels = int(seg.max()) if seg is not None and seg.size else 0
    cmap = ListedColormap([colours[i % 10] for i in range(max(n_labels, 1))])
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.8))
    for ax, (name, sl, aspect, (right, up)) in zip(axes, panels):
        # transpose so the first index runs left->right and the second bottom->top (origin lower)
        ax.imshow(image[sl].T, cmap="gray", vmin=lo, vmax=hi, origin="lower", aspect=aspect,
                  interpolation="nearest")
        if seg is not None:
            s = seg[sl].T
            ax.imshow(np.ma.masked_where(s == 0, s - 1), cmap=cmap, vmin=0, vmax=max(n_labels - 1, 0) + 1e-9,
                      alpha=alpha, origin="lower", aspect=aspect, interpolation="nearest")
        ax.set_title(name)
        ax.set_xlabel(f"-> {right}")
        ax.set_ylabel(f"-> {up}")
        ax.set_xticks([])
        ax.set_yticks([])
    if seg is not None and n_labels:
        from matplotlib.patches import Patch

        fig.legend(handles=[Patch(color=colours[(i - 1) % 10], label=f"label {i}") for i in range(1, n_labels + 1)],
                   loc="lower center", ncol=min(n_labels, 8), frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.06 if seg is not None else 0, 1, 1))
    try:
        with atomic_path(out, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=dpi, format="png")
    finally:
        plt.close(fig)
    return out


def run(args: argparse.Namespace) -> int:
    from ahnet_fast.data.nifti import load_label, load_volume

    try:
        vol = load_volume(args.image, nonfinite="zero")
        seg = load_label(args.seg, vol) if args.seg else None
        inv = tuple(int(i) for i in np.argsort(vol.perm))  # network layout -> canonical RAS
        image = vol.array.transpose(inv)
        spacing = [vol.spacing[i] for i in inv]
        seg_c = seg.transpose(inv) if seg is not None else None
        render(image, spacing, seg_c, args.out, center=args.slice, alpha=args.alpha, dpi=args.dpi,
               title=Path(args.image).name + (f"  +  {Path(args.seg).name}" if args.seg else ""))
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}")
    return 0

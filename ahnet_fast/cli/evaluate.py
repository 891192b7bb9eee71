"""`ahnet-fast evaluate PRED_DIR GT_DIR` (or `--pred DIR --gt DIR`): Dice / HD95 / ASD of predicted label maps."""
from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="Dice (per case, global), HD95 and ASD of predictions against ground truth",
        description=(
            "Compare every ground-truth label map in the ground-truth folder with the prediction of the same name. "
            "Give the folders as PRED_DIR GT_DIR (this order; nnU-Net's evaluate takes GT first) or by name with "
            "--pred and --gt; folder names that look swapped (a prediction folder called labelsTs, ...) are refused. "
            "Prints a summary table (Dice averaged per case, LiTS global Dice, HD95 and average symmetric surface "
            "distance in mm) with class names from a dataset.json next to the ground truth or --classes; --csv "
            "writes one row per case and label."
        ),
    )
    p.add_argument("pred_dir", metavar="PRED_DIR", nargs="?", help="folder of predicted label maps")
    p.add_argument("gt_dir", metavar="GT_DIR", nargs="?", help="folder of ground-truth label maps")
    p.add_argument("--pred", dest="pred_opt", metavar="DIR", help="folder of predicted label maps")
    p.add_argument("--gt", dest="gt_opt", metavar="DIR", help="folder of ground-truth label maps")
    p.add_argument("--classes", metavar="FILE", default=None,
                   help="class names from this dataset.json or checkpoint (default: a dataset.json in the "
                        "ground-truth folder or its parent, if any)")
    p.add_argument("--csv", default=None, help="write per-case metrics to this CSV file")
    p.add_argument("--labels", type=int, nargs="+", default=None,
                   help="labels to score (default: every non-zero label found)")
    p.add_argument("--no-surface", action="store_true", help="skip HD95/ASD (Dice only, faster; no distance columns)")
    p.set_defaults(func=run)


def folders(args: argparse.Namespace) -> tuple[str, str]:
    """(prediction folder, ground-truth folder) from the arguments; ``ValueError`` when unclear."""
    from ahnet_fast.infer.evaluate import order_problem

    positional = [v for v in (args.pred_dir, args.gt_dir) if v is not None]
    named = args.pred_opt is not None or args.gt_opt is not None
    if named:
        if positional:
            raise ValueError("give the folders either as PRED_DIR GT_DIR or with --pred and --gt, not both")
        if args.pred_opt is None or args.gt_opt is None:
            raise ValueError("--pred and --gt go together: give both folders")
        return args.pred_opt, args.gt_opt
    if len(positional) != 2:
        raise ValueError("expected two folders: PRED_DIR GT_DIR (or --pred DIR --gt DIR)")
    problem = order_problem(args.pred_dir, args.gt_dir)
    if problem:
        raise ValueError(problem)
    return args.pred_dir, args.gt_dir


def run(args: argparse.Namespace) -> int:
    from ahnet_fast.infer.evaluate import (
        class_names_from,
        evaluate_folders,
        find_class_names,
        format_table,
        summarise,
        write_csv,
    )

    try:
        pred_dir, gt_dir = folders(args)
        if args.classes:
            names, source = class_names_from(args.classes), args.classes
        else:
            names, source = find_class_names(gt_dir)
        results = evaluate_folders(pred_dir, gt_dir, labels=args.labels, surface=not args.no_surface)
        if args.csv:
            write_csv(results, args.csv, names=names, surface=not args.no_surface)
    except (OSError, ValueError) as exc:
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"ahnet-fast: error: {text}", file=sys.stderr)
        return 1
    print(format_table(summarise(results), names, surface=not args.no_surface))
    if source:
        print(f"class names: {source}")
    if args.csv:
        print(f"per-case metrics: {args.csv}")
    return 0

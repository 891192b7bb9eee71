"""`ahnet-fast evaluate PRED_DIR GT_DIR`: Dice / HD95 / ASD of predicted label maps."""
from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="Dice (per case, global), HD95 and ASD of predictions against ground truth",
        description=(
            "Compare every ground-truth label map in GT_DIR with the prediction of the same name in PRED_DIR. "
            "Prints a summary table (Dice averaged per case, LiTS global Dice, HD95 and average symmetric "
            "surface distance in mm); --csv writes one row per case and label."
        ),
    )
    p.add_argument("pred_dir", metavar="PRED_DIR")
    p.add_argument("gt_dir", metavar="GT_DIR")
    p.add_argument("--csv", default=None, help="write per-case metrics to this CSV file")
    p.add_argument("--labels", type=int, nargs="+", default=None,
                   help="labels to score (default: every non-zero label found)")
    p.add_argument("--no-surface", action="store_true", help="skip HD95/ASD (Dice only, faster)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ahnet_fast.infer.evaluate import evaluate_folders, format_table, summarise, write_csv

    try:
        results = evaluate_folders(args.pred_dir, args.gt_dir, labels=args.labels, surface=not args.no_surface)
        if args.csv:
            write_csv(results, args.csv)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(format_table(summarise(results)))
    if args.csv:
        print(f"per-case metrics: {args.csv}")
    return 0

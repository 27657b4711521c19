"""``nnUNetv2_csa_benchmark``: the command line of :func:`run_benchmark`.
"""
from __future__ import annotations

import argparse
from typing import Sequence

from nnunetv2_csa.errors import one_line_errors
from nnunetv2_csa.tools.benchmark.common import BenchmarkError
from nnunetv2_csa.tools.benchmark.pipeline import run_benchmark
from nnunetv2_csa.tools.inputs import integer_at_least
from nnunetv2_csa.tools.benchmark.rows import ALL_ROWS, LAMBDA_ROWS, ROWS, SINGLE_BUDGETS


def _fold_numbers(values: Sequence[str]) -> list[int]:
    try:
        return [int(v) for v in values]
    except ValueError:
        raise BenchmarkError(f"--folds takes fold numbers or 'all', not {' '.join(values)}") from None


@one_line_errors()
def main(argv: Sequence[str] | None = None) -> None:
    """Console script; returns nothing (a console script's return value becomes its exit status)."""
    parser = argparse.ArgumentParser(
        prog="nnUNetv2_csa_benchmark",
        description="Train the paper's rows (Single, Joint, MSBN, Affinity, UMMKD, CSA) with nnUNetv2_train, "
                    "evaluate the fold's held-out cases, time each trainer, and write report.md, results.csv, "
                    "results.json and PNG plots.",
        epilog="The rows' trainer classes (nnUNetTrainerCSA, nnUNetTrainerMSBN, ... and their _BN twins and "
               "_<E>epochs_<I>its variants) are made from the row table in nnunetv2_csa/training/rows.py.")
    parser.add_argument("-d", required=True, help="dataset ID or name")
    parser.add_argument("-c", default="2d", help="configuration (default 2d)")
    parser.add_argument("-p", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    folds = parser.add_mutually_exclusive_group()
    folds.add_argument("-f", type=integer_at_least(0), default=None,
                       help="one fold; with a converter's --split 80-20, fold 0 is the paper's 80/20 split (default 0)")
    folds.add_argument("--folds", nargs="+", default=None, metavar="FOLD",
                       help="several folds (e.g. 0 1 2 3 4, or 'all'): every held-out patient is scored once and "
                            "the report pools them (means, per-fold table, Wilcoxon, bootstrap intervals, Holm)")
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--budget", nargs=2, type=integer_at_least(1), metavar=("EPOCHS", "ITERATIONS"),
                        help="short budget: the trainers' _<EPOCHS>epochs_<ITERATIONS>its variants")
    budget.add_argument("--full-budget", action="store_true", help="nnU-Net's 1000 epochs x 250 iterations")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=ALL_ROWS,
                        help="rows (default the paper's six); the λ ablations (paper units: 0.25, 1; CSA is 0.5) "
                             f"are {', '.join(LAMBDA_ROWS)}")
    parser.add_argument("--norm", default="instance", choices=("instance", "bn"),
                        help="instance: the plan's InstanceNorm; bn: the _BN trainers (default instance)")
    parser.add_argument("-device", default="cuda", choices=("cpu", "cuda"), help="default cuda, as nnUNetv2_train")
    parser.add_argument("-o", default=None, help="report folder (default: $nnUNet_results/<Dataset>/"
                                                 "csa_benchmark__<plans>__<config>__fold<f>__<budget>__<norm>, "
                                                 "folds<a>-<b>-... for several folds)")
    parser.add_argument("--single-budget", default="equal-iterations", choices=SINGLE_BUDGETS,
                        help="Single's budget: the joint rows' iterations (default), or equal-data: as many slices "
                             "of its modality as the joint rows see (1/n of the iterations)")
    parser.add_argument("--rerun", action="store_true", help="train finished rows again")
    parser.add_argument("--timing-iterations", type=integer_at_least(0), default=10,
                        help="timed training iterations per trainer (default 10; 0 skips the timing)")
    parser.add_argument("--retime", action="store_true",
                        help="time every trainer again; by default a rerun keeps the first timing (and its date) "
                             "of each trainer, so a rerun under other load does not silently replace it")
    args = parser.parse_args(argv)
    if args.folds is not None:
        folds = "all" if args.folds == ["all"] else _fold_numbers(args.folds)
    else:
        folds = [0 if args.f is None else args.f]
    run_benchmark(args.d, args.c, args.p, folds, None if args.full_budget else tuple(args.budget),
                  args.rows, args.norm, args.device, args.o, args.rerun, args.timing_iterations,
                  single_budget=args.single_budget, retime=args.retime)



if __name__ == "__main__":
    main()

"""The main job in one command: the whole method, end to end, on a small budget.

Stages (each one line on stdout; nnU-Net's verbose output goes to ``<output>/logs``):

1. data       phantom MS-CMRSeg-layout volumes (LGE, bSSFP/C0), or ``--data`` in a supported layout
2. convert    into a modality-tagged nnU-Net raw dataset with a patient-grouped 80/20 split
3. plan       nnU-Net's own planning and preprocessing (a reduced 2D plan for CPU on real data)
4. benchmark  train the rows (stock nnU-Net and nnUNetTrainerCSA by default), evaluate the
              held-out cases, time the trainers and write the report

Re-running reuses finished stages (and finished rows); an interrupted stage is redone, as
each stage only marks itself done after it completed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from nnunetv2_csa.errors import UserInputError
from nnunetv2_csa.tools.commands import run_console
from nnunetv2_csa.tools.inputs import integer_at_least

DEFAULT_ROWS = ("Joint", "CSA")
DEFAULT_BUDGET = (10, 10)
DEMO_DATASET_ID = 990
LAYOUTS = ("mscmrseg", "mmwhs", "myops")
MODALITIES = {"mscmrseg": ("LGE", "C0"), "myops": ("LGE", "C0"), "mmwhs": ("CT", "MR")}
#: the reduced CPU plan for real data (2 mm in-plane, batch 8, patch 96 x 96 on cropped MyoPS: documentation/results.md)
CPU_PLANS_NAME = "nnUNetPlansCPU"
CPU_TARGET_SPACING = ("5", "2.0", "2.0")
CPU_GPU_MEMORY_TARGET = "0.18"
CONFIGURATIONS = ("2d", "3d_fullres")


class DemoError(UserInputError, RuntimeError):
    pass


def say(message: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {message}", flush=True)


def detect_layout(folder: str) -> str:
    names = [f for _, _, files in os.walk(folder) for f in files]
    if any(f.endswith("_gd.nii.gz") for f in names):
        return "myops"
    if any(f.endswith("_manual.nii.gz") for f in names):
        return "mscmrseg"
    if any(f.endswith("_label.nii.gz") and f.startswith(("ct_train_", "mr_train_")) for f in names):
        return "mmwhs"
    raise DemoError(f"{folder} holds no files of a supported layout (MS-CMRSeg 2019 *_manual.nii.gz, MyoPS 2020 "
                    f"*_gd.nii.gz, MM-WHS 2017 {{ct,mr}}_train_*_label.nii.gz); give --layout or another folder")


class Stages:
    """Done-markers for the stages, so that a re-run skips what is finished."""

    def __init__(self, output: str):
        self.folder = os.path.join(output, "logs")
        os.makedirs(self.folder, exist_ok=True)

    def done(self, name: str) -> bool:
        return os.path.isfile(os.path.join(self.folder, f"{name}.done"))

    def mark(self, name: str, info: dict | None = None) -> None:
        with open(os.path.join(self.folder, f"{name}.done"), "w") as f:
            json.dump(info or {}, f)

    def log(self, name: str) -> str:
        return os.path.join(self.folder, f"{name}.log")


def run_logged(args: list[str], log_file: str) -> None:
    """Run an nnU-Net console script of this Python environment, its output to ``log_file``."""
    with open(log_file, "a") as log:
        result = run_console(args[0], args[1:], log)
    if result.returncode != 0:
        with open(log_file) as f:
            tail = f.read()[-2000:]
        raise DemoError(f"{args[0]} failed (exit {result.returncode}); see {log_file}:\n{tail}")


def make_phantom(folder: str, n_patients: int, size: int) -> None:
    from nnunetv2_csa.tools.phantom import write_mscmrseg_phantom

    staging = folder + ".partial"
    if os.path.isdir(staging):
        import shutil
        shutil.rmtree(staging)
    write_mscmrseg_phantom(staging, n_patients=n_patients, modalities=MODALITIES["mscmrseg"], seed=2020,
                           in_plane_size=size)
    os.replace(staging, folder)


def convert(layout: str, source: str, dataset_id: int, crop) -> str:
    from dataset_conversion import convert_mmwhs, convert_mscmrseg, convert_myops

    converter = {"mscmrseg": convert_mscmrseg, "myops": convert_myops, "mmwhs": convert_mmwhs}[layout]
    kwargs = {"modalities": MODALITIES[layout], "split": "80-20", "crop": crop, "overwrite": True}
    if layout == "mmwhs":
        kwargs["coronal"] = True
    return converter(source, dataset_id, **kwargs)


def plan_and_preprocess(dataset_id: int, reduced: bool, log_file: str, configuration: str = "2d") -> str:
    d = str(dataset_id)
    if not reduced:
        run_logged(["nnUNetv2_plan_and_preprocess", "-d", d, "-c", configuration, "-np", "2", "-npfp", "2",
                    "--verify_dataset_integrity"], log_file)
        return "nnUNetPlans"
    run_logged(["nnUNetv2_extract_fingerprint", "-d", d, "-np", "2", "--verify_dataset_integrity"], log_file)
    run_logged(["nnUNetv2_plan_experiment", "-d", d, "-overwrite_target_spacing", *CPU_TARGET_SPACING,
                "-gpu_memory_target", CPU_GPU_MEMORY_TARGET, "-overwrite_plans_name", CPU_PLANS_NAME], log_file)
    run_logged(["nnUNetv2_preprocess", "-d", d, "-plans_name", CPU_PLANS_NAME, "-c", configuration, "-np", "2"],
               log_file)
    return CPU_PLANS_NAME


def summarize(report_folder: str) -> list[str]:
    """A few lines on what the report shows: mean Dice over classes per row and modality."""
    import pandas as pd

    results = pd.read_csv(os.path.join(report_folder, "results.csv"))
    table = results.groupby(["modality", "row"])["dice"].mean().unstack("modality")
    lines = ["mean Dice over classes and held-out cases:"]
    lines += ["  " + line for line in table.round(3).to_string().splitlines()]
    return lines


def run_demo(output: str = "demo_output", data: str | None = None, layout: str | None = None,
             rows=DEFAULT_ROWS, budget=DEFAULT_BUDGET, device: str = "cpu", dataset_id: int = DEMO_DATASET_ID,
             phantom_patients: int = 10, phantom_size: int = 48, timing_iterations: int = 5,
             configuration: str = "2d") -> str:
    from nnunetv2_csa.tools.benchmark.rows import ALL_ROWS

    # every input checked before the first folder is made
    if configuration not in CONFIGURATIONS:
        raise DemoError(f"configuration {configuration!r}: choose one of {list(CONFIGURATIONS)}")
    unknown = [r for r in rows if r not in ALL_ROWS]
    if unknown:
        raise DemoError(f"unknown rows {unknown}; choose from {list(ALL_ROWS)}")
    if data is not None and not os.path.isdir(data):
        raise DemoError(f"--data {data} is not a folder")
    if data is None:
        from nnunetv2_csa.tools.phantom import check_mscmrseg_request
        try:
            check_mscmrseg_request(phantom_patients, phantom_size)
        except ValueError as e:
            raise DemoError(f"--phantom-patients/--phantom-size: {e}") from None
    if os.path.exists(output) and not os.path.isdir(output):
        raise DemoError(f"--output {output} is a file; give a folder for the demo's data and report")
    output = os.path.abspath(output)
    os.makedirs(output, exist_ok=True)
    stages = Stages(output)
    # nnU-Net reads its folders from the environment when it is imported: set them first
    for variable, sub in (("nnUNet_raw", "nnUNet_raw"), ("nnUNet_preprocessed", "nnUNet_preprocessed"),
                          ("nnUNet_results", "nnUNet_results")):
        os.environ[variable] = os.path.join(output, sub)
        os.makedirs(os.environ[variable], exist_ok=True)
    os.environ.setdefault("nnUNet_def_n_proc", "2")
    from nnunetv2_csa.ext_trainers import TRAINER_DIR
    os.environ["nnUNet_extTrainer"] = TRAINER_DIR
    started = time.time()

    if data is None:
        layout, source = "mscmrseg", os.path.join(output, "phantom")
        if not os.path.isdir(source):
            say(f"1/4 data: writing phantom MS-CMRSeg volumes ({phantom_patients} patients, LGE and C0)")
            make_phantom(source, phantom_patients, phantom_size)
        else:
            say("1/4 data: phantom present, reused")
    else:
        source = os.path.abspath(data)
        layout = layout or detect_layout(source)
        say(f"1/4 data: {source} ({layout} layout)")

    real_data = data is not None
    if not stages.done("convert"):
        crop = (224, 224) if real_data and layout != "mmwhs" else None
        say(f"2/4 convert: {layout} -> nnU-Net dataset {dataset_id}" + (f", crop {crop}" if crop else ""))
        folder = convert(layout, source, dataset_id, crop)
        stages.mark("convert", {"dataset_folder": folder})
    else:
        say("2/4 convert: done before, reused")

    reduced_plan = real_data and device == "cpu"
    # one stage (and one report) per configuration: a 3d_fullres run after a 2d one reuses the
    # data and the conversion, and never mixes its timings or scores with the 2d report's
    plan_stage = "plan" if configuration == "2d" else f"plan_{configuration}"
    if not stages.done(plan_stage):
        say(f"3/4 plan and preprocess (nnU-Net, {configuration})" + (" with a reduced CPU plan" if reduced_plan
                                                                     else ""))
        plans = plan_and_preprocess(dataset_id, reduced_plan, stages.log(plan_stage), configuration)
        stages.mark(plan_stage, {"plans": plans})
    else:
        say(f"3/4 plan and preprocess ({configuration}): done before, reused")
    with open(os.path.join(stages.folder, f"{plan_stage}.done")) as f:
        plans = json.load(f)["plans"]

    say(f"4/4 benchmark: rows {list(rows)}, {configuration}, budget {budget[0]} epochs x {budget[1]} iterations, "
        f"device {device}")
    from nnunetv2_csa.tools.benchmark.pipeline import run_benchmark
    report_folder = os.path.join(output, "report" if configuration == "2d" else f"report_{configuration}")
    report = run_benchmark(dataset_id, configuration, plans, 0, budget=tuple(budget), rows=list(rows), device=device,
                           report_folder=report_folder, timing_iterations=timing_iterations)
    say(f"finished in {time.time() - started:.0f} s; the report is {os.path.join(report, 'report.md')}")
    for line in summarize(report):
        print(line)
    print(f"plots: {report}/*.png; per case and class: {report}/results.csv")
    return report


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="nnUNetv2_csa_demo",
        description="End-to-end demo: data -> nnU-Net dataset -> plan -> train stock nnU-Net and nnUNetTrainerCSA "
                    "-> predict held-out cases -> evaluate -> report. Default data: built-in phantoms.")
    parser.add_argument("--output", default="demo_output", help="output folder (default: demo_output)")
    parser.add_argument("--data", default=None, help="a real dataset folder in the MS-CMRSeg 2019, MyoPS 2020 or "
                                                     "MM-WHS 2017 layout instead of the phantom")
    parser.add_argument("--layout", choices=LAYOUTS, default=None, help="layout of --data (default: detected)")
    parser.add_argument("--rows", nargs="+", default=list(DEFAULT_ROWS),
                        help="rows of the paper's table to train (Single Joint MSBN Affinity UMMKD CSA)")
    parser.add_argument("--budget", nargs=2, type=integer_at_least(1), default=list(DEFAULT_BUDGET),
                        metavar=("EPOCHS", "ITERATIONS"),
                        help="short budget per row (default: 10 epochs x 10 iterations)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="device of training and prediction (default cpu)")
    parser.add_argument("--dataset-id", type=integer_at_least(1), default=DEMO_DATASET_ID,
                        help=f"nnU-Net dataset ID the demo converts into (default {DEMO_DATASET_ID})")
    parser.add_argument("--timing-iterations", type=integer_at_least(0), default=5,
                        help="timed training iterations per trainer (default 5; 0 skips the timing)")
    parser.add_argument("-c", "--configuration", default="2d", choices=CONFIGURATIONS,
                        help="nnU-Net configuration (default 2d, the paper's); 3d_fullres writes its report to "
                             "<output>/report_3d_fullres and reuses the data and conversion of a 2d run")
    parser.add_argument("--phantom-patients", type=integer_at_least(1), default=10,
                        help="phantom patients (default 10)")
    parser.add_argument("--phantom-size", type=integer_at_least(1), default=48,
                        help="phantom in-plane matrix (default 48)")
    args = parser.parse_args(argv)
    try:
        run_demo(args.output, args.data, args.layout, args.rows, args.budget, args.device, args.dataset_id,
                 phantom_patients=args.phantom_patients, phantom_size=args.phantom_size,
                 timing_iterations=args.timing_iterations, configuration=args.configuration)
    except KeyboardInterrupt:
        say("interrupted; run the same command again to continue from the last finished stage")
        sys.exit(130)
    except UserInputError as e:  # the known failures get one clear line, the rest a traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()

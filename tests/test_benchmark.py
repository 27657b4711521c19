"""nnUNetv2_csa_benchmark end to end on the tiny phantom (1 epoch x 5 iterations), plus unit
tests of the table formatting and the row -> trainer naming."""
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from conftest import TINY_DATASET_ID, run_command
from nnunetv2_csa import benchmark
from nnunetv2_csa.benchmark import (BenchmarkError, RESULT_COLUMNS, best_marks, error_from_log, format_table,
                                    trainer_name)

RUN_ROWS = ["Single", "Joint", "CSA"]
BUDGET = ("1", "5")
CLASSES = ["myocardium", "left_ventricle", "right_ventricle"]
MODALITIES = ["LGE", "C0"]


# --------------------------------------------------------------------------- unit tests

def test_best_per_column_is_bold_max_for_dice_min_for_hd_ties_all_marked():
    means = pd.DataFrame({"Dice myo": [0.80, 0.85, 0.85, np.nan], "HD myo": [4.0, 3.5, np.nan, 9.0]},
                         index=["Joint", "MSBN", "CSA", "Single"])
    stds = pd.DataFrame({"Dice myo": [0.01, np.nan, 0.02, 0.1], "HD myo": [1.0, 0.5, 0.2, 0.3]}, index=means.index)
    higher = {"Dice myo": True, "HD myo": False}

    marks = best_marks(means, higher)
    assert marks["Dice myo"].tolist() == [False, True, True, False]  # tie at 0.850: both
    assert marks["HD myo"].tolist() == [False, True, False, False]  # min, NaN ignored

    lines = format_table(means, higher, stds).splitlines()
    assert lines[0] == "| Method | Dice myo | HD myo |"
    assert lines[2] == "| Joint | 0.800 ± 0.010 | 4.000 ± 1.000 |"
    assert lines[3] == "| MSBN | **0.850** | **3.500** ± 0.500 |"  # NaN std left out
    assert lines[4] == "| CSA | **0.850** ± 0.020 | n/a |"
    assert lines[5] == "| Single | n/a | 9.000 ± 0.300 |"


def test_failed_row_is_flagged_and_never_marked_best():
    means = pd.DataFrame({"Dice a": [0.9, 0.5], "HD a": [1.0, 2.0]}, index=["CSA", "Joint"])
    lines = format_table(means, {"Dice a": True, "HD a": False}, failed={"CSA": "boom | bad\nsecond"},
                         decimals=2).splitlines()
    assert lines[2] == "| CSA | FAILED: boom \\| bad second | FAILED |"
    assert lines[3] == "| Joint | **0.50** | **2.00** |"


def test_trainer_names_of_rows():
    assert trainer_name("CSA") == "nnUNetTrainerCSA"
    assert trainer_name("Joint", "bn", (1, 5)) == "nnUNetTrainerJoint_BN_1epochs_5its"
    assert trainer_name("Single", "instance", (2, 10), 1) == "nnUNetTrainerSingleModality1_2epochs_10its"
    with pytest.raises(BenchmarkError, match="epochs one of"):
        trainer_name("CSA", budget=(3, 5))
    with pytest.raises(BenchmarkError, match="unknown row"):
        trainer_name("Bogus")


def test_error_from_log_takes_the_last_exception_line():
    log = "Using device: cpu\nTraceback (most recent call last):\n  File x\nRuntimeError: Could not find X\n\n"
    assert error_from_log(log) == "RuntimeError: Could not find X"
    assert error_from_log("a\nlast words\n") == "last words"
    assert error_from_log("") == "no output"


# --------------------------------------------------------------------------- end to end

def _markdown_tables(section: str) -> list[list[list[str]]]:
    """The tables of a markdown section, each as rows of cells (header and separator dropped)."""
    tables, current = [], []
    for line in section.splitlines() + [""]:
        if line.startswith("|"):
            current.append([c.strip() for c in line.strip().strip("|").split(" | ")])
        elif current:
            tables.append(current[2:])
            current = []
    return tables


def _section(text: str, heading: str) -> str:
    start = text.index(heading)
    following = re.search(r"^#{2,3} ", text[start + len(heading):], re.M)
    return text[start: start + len(heading) + following.start()] if following else text[start:]


@pytest.fixture(scope="module")
def benchmark_run(tiny_preprocessed_dataset, tmp_path_factory):
    env, dataset_name = tiny_preprocessed_dataset
    report = tmp_path_factory.mktemp("benchmark") / "report"
    result = run_command(["nnUNetv2_csa_benchmark", "-d", str(TINY_DATASET_ID), "--budget", *BUDGET,
                          "--rows", *RUN_ROWS, "-device", "cpu", "--timing-iterations", "2", "-o", str(report)],
                         env, timeout=1800)
    return env, dataset_name, report, result.stdout


@pytest.mark.integration
def test_report_has_every_row_bold_best_wilcoxon_and_timing(benchmark_run):
    _, dataset_name, report, stdout = benchmark_run
    text = (report / "report.md").read_text()
    assert "stage 4/4" in stdout and "FAILED" not in text
    assert re.search(r"\bnan\b|\binf\b", text, re.I) is None
    assert "1 epochs × 5 training iterations" in text and "seed (dataset.json `csa_conversion`): 12345" in text
    assert "final-validation predictions" in text and "patch [48, 48]" in text

    for modality in MODALITIES:
        tables = _markdown_tables(_section(text, f"### {modality} "))
        assert len(tables) == 2  # Dice + HD, then HD95 + ASSD
        for table in tables:
            assert [cells[0] for cells in table] == RUN_ROWS
            n_columns = len(table[0])
            assert n_columns == 1 + 2 * (len(CLASSES) + 1)
            for column in range(1, n_columns):
                values = [cells[column] for cells in table]
                assert any(v.startswith("**") for v in values), (modality, column, values)
                for v in values:
                    mean = float(v.replace("**", "").split(" ± ")[0])
                    assert math.isfinite(mean)
            dice_columns = range(1, 1 + len(CLASSES) + 1) if table is tables[0] else []
            for column in dice_columns:
                values = [float(cells[column].replace("**", "").split(" ± ")[0]) for cells in table]
                bold = [cells[column].startswith("**") for cells in table]
                assert bold == [round(v, 3) == round(max(values), 3) for v in values]

    wilcoxon = _markdown_tables(_section(text, "## Wilcoxon"))[0]
    assert [cells[0] for cells in wilcoxon] == ["CSA vs Single", "CSA vs Joint"]
    for cells in wilcoxon:
        assert len(cells) == 1 + 2 * len(MODALITIES)
        for cell in cells[1:]:
            p = cell.split(" ")[0]
            assert p == "n/a" or 0.0 <= float(p) <= 1.0, cell

    timing = _markdown_tables(_section(text, "## Training cost"))[0]
    assert [cells[0] for cells in timing] == RUN_ROWS
    by_row = {cells[0]: cells for cells in timing}
    assert by_row["Joint"][1] == "nnUNetTrainerJoint_1epochs_5its"
    assert by_row["Joint"][4] == "1.00" and by_row["Joint"][6] in ("1.00", "n/a")
    for cells in timing:
        assert float(cells[2]) > 0 and float(cells[3]) > 0 and float(cells[4]) > 0
        assert float(cells[5]) >= 0


@pytest.mark.integration
def test_results_csv_and_json_are_complete_and_finite(benchmark_run):
    env, dataset_name, report, _ = benchmark_run
    df = pd.read_csv(report / "results.csv")
    assert list(df.columns) == list(RESULT_COLUMNS)
    with open(os.path.join(env["nnUNet_preprocessed"], dataset_name, "splits_final.json")) as f:
        test_cases = sorted(json.load(f)[0]["val"])
    assert sorted(df["row"].unique()) == sorted(RUN_ROWS)
    assert len(df) == len(RUN_ROWS) * len(test_cases) * len(CLASSES)
    for row in RUN_ROWS:
        assert sorted(df.loc[df["row"] == row, "case"].unique()) == test_cases
    assert np.isfinite(df[["dice", "hd", "hd95", "assd"]].to_numpy()).all()
    assert df["dice"].between(0, 1).all() and (df["hd"] >= df["hd95"] - 1e-9).all()
    # Single scores each modality with the model trained on it
    single = df[df["row"] == "Single"]
    assert set(zip(single["modality"], single["trainer"])) == {
        ("LGE", "nnUNetTrainerSingleModality0_1epochs_5its"), ("C0", "nnUNetTrainerSingleModality1_1epochs_5its")}
    assert set(df.loc[df["case"].str.endswith("_LGE"), "modality"]) == {"LGE"}

    def no_nan(value):
        raise AssertionError(f"results.json holds {value}")
    with open(report / "results.json") as f:
        summary = json.load(f, parse_constant=no_nan)
    assert [r["status"] for r in summary["rows"]] == ["ok"] * len(RUN_ROWS)
    assert len(summary["cases"]) == len(df) and summary["budget"] == {"epochs": 1, "iterations_per_epoch": 5}


@pytest.mark.integration
def test_plots_are_written(benchmark_run):
    _, _, report, _ = benchmark_run
    files = ["dice_boxplots.png", "overlay.png"] + [f"training_curves_{row}.png" for row in RUN_ROWS]
    for name in files:
        data = (report / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name


@pytest.mark.integration
def test_rerun_skips_finished_rows_and_a_failing_row_is_reported(benchmark_run, tmp_path, monkeypatch, capsys):
    env, dataset_name, report, _ = benchmark_run
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer", "nnUNet_def_n_proc",
                "nnUNet_compile"):
        monkeypatch.setenv(key, env[key])
    # a row whose trainer nnU-Net cannot find: its training command fails like any broken row
    monkeypatch.setitem(benchmark.ROW_TRAINERS, "MSBN", "nnUNetTrainerDoesNotExist")
    results = os.path.join(env["nnUNet_results"], dataset_name)
    checkpoints = {name: os.path.getmtime(os.path.join(results, f"{name}__nnUNetPlans__2d", "fold_0",
                                                       "checkpoint_final.pth"))
                   for name in ("nnUNetTrainerJoint_1epochs_5its", "nnUNetTrainerCSA_1epochs_5its")}
    second = tmp_path / "second"

    benchmark.run_benchmark(TINY_DATASET_ID, budget=(1, 5), rows=["Joint", "MSBN", "CSA"], device="cpu",
                            report_folder=str(second), timing_iterations=0)

    stdout = capsys.readouterr().out
    assert "Joint: nnUNetTrainerJoint_1epochs_5its is trained and validated already: skipped" in stdout
    assert "CSA: nnUNetTrainerCSA_1epochs_5its is trained and validated already: skipped" in stdout
    for name, mtime in checkpoints.items():
        checkpoint = os.path.join(results, f"{name}__nnUNetPlans__2d", "fold_0", "checkpoint_final.pth")
        assert os.path.getmtime(checkpoint) == mtime
        assert not (second / "logs" / f"train_{name}.log").exists()

    text = (second / "report.md").read_text()
    for modality in MODALITIES:
        dice_table = _markdown_tables(_section(text, f"### {modality} "))[0]
        by_row = {cells[0]: cells for cells in dice_table}
        assert list(by_row) == ["Joint", "MSBN", "CSA"]
        assert by_row["MSBN"][1].startswith("FAILED: training nnUNetTrainerDoesNotExist_1epochs_5its exited")
        assert "Could not find requested nnunet trainer" in by_row["MSBN"][1]
        assert set(by_row["MSBN"][2:]) == {"FAILED"}
        for row in ("Joint", "CSA"):
            assert all(math.isfinite(float(c.replace("**", "").split(" ± ")[0])) for c in by_row[row][1:])
    assert [c[0] for c in _markdown_tables(_section(text, "## Wilcoxon"))[0]] == ["CSA vs Joint"]
    assert "Not measured (--timing-iterations 0)" in text
    df = pd.read_csv(second / "results.csv")
    assert sorted(df["row"].unique()) == ["CSA", "Joint"]
    with open(second / "results.json") as f:
        statuses = {r["row"]: r["status"] for r in json.load(f)["rows"]}
    assert statuses == {"Joint": "ok", "MSBN": "failed", "CSA": "ok"}


@pytest.mark.integration
def test_timing_cli_prints_json_and_leaves_no_model_folder(tiny_preprocessed_dataset):
    env, dataset_name = tiny_preprocessed_dataset
    trainer = "nnUNetTrainerMSBN_2epochs_5its"  # trained by no test
    env = dict(env, nnUNet_n_proc_DA="0")
    result = subprocess.run([sys.executable, "-m", "nnunetv2_csa.timing", "-d", str(TINY_DATASET_ID), "-tr", trainer,
                             "-device", "cpu", "-n", "2", "--warmup", "1"], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    timing = json.loads(result.stdout.strip().splitlines()[-1])
    assert timing["trainer"] == trainer and timing["iterations"] == 2 and len(timing["seconds_per_iteration"]) == 2
    assert 0 < timing["seconds_per_iteration_median"] < 60 and timing["batch_size"] >= 2
    assert timing["peak_memory_kind"] == "cpu_peak_rss_increase" and timing["peak_memory_bytes"] >= 0
    assert not os.path.exists(os.path.join(env["nnUNet_results"], dataset_name, f"{trainer}__nnUNetPlans__2d"))

"""nnUNetv2_csa_benchmark end to end on a tiny unpaired phantom (1 epoch x 5 iterations), plus
unit tests of the table formatting and the row -> trainer naming."""
import json
import math
import os
import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest

from conftest import TINY_DATASET_ID, plans_variant, run_command
from nnunetv2_csa.modality import ModalityTagError
from nnunetv2_csa.tools.benchmark import pipeline, report, rows as benchmark_rows, runner, scoring, tables
from nnunetv2_csa.tools.benchmark.common import BenchmarkError
from nnunetv2_csa.tools.benchmark.rows import trainer_name
from nnunetv2_csa.tools.benchmark.runner import error_from_log
from nnunetv2_csa.tools.benchmark.scoring import RESULT_COLUMNS
from nnunetv2_csa.tools.benchmark.tables import best_marks, format_table

RUN_ROWS = ["Joint", "CSA"]  # Single (a model per modality) runs end to end in tests/test_demo.py
#: how the report's tables name the rows: with their normalization (the plan's InstanceNorm here)
RUN_ROW_LABELS = ["Joint (IN shared)", "CSA (IN per modality)"]
FOLDS = [0, 1]
BUDGET = ("1", "5")
CLASSES = ["myocardium", "left_ventricle", "right_ventricle"]
MODALITIES = ["LGE", "C0"]
UNPAIRED_DATASET_ID = TINY_DATASET_ID  # the session's dataset (conftest.py) is unpaired
#: the session dataset's plans at an eighth of their width: the benchmark's work is nnU-Net's processes
#: (training, final validation, prediction), not the network's arithmetic
PLANS = "nnUNetPlansBenchmark"


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


def test_the_tables_name_the_norm_of_each_row():
    # the rows' names do not say IN or BN: MSBN and CSA use modality-specific InstanceNorm by default
    expected = {("CSA", "instance"): "IN per modality", ("MSBN", "bn"): "BN per modality",
                ("UMMKD", "instance"): "IN per modality", ("Joint", "instance"): "IN shared",
                ("Joint", "bn"): "BN shared", ("Single", "instance"): "IN", ("Single", "bn"): "BN"}
    for (row, norm), name in expected.items():
        assert benchmark_rows.norm_of_row(row, norm) == name, (row, norm)
    with pytest.raises(BenchmarkError, match="norm must be"):
        benchmark_rows.norm_of_row("CSA", "group")
    means = pd.DataFrame({"Dice a": [0.9, 0.5]}, index=["CSA", "Joint"])
    lines = format_table(means, {"Dice a": True}, labels={"CSA": "CSA (BN per modality)"}).splitlines()
    assert lines[2] == "| CSA (BN per modality) | **0.900** |" and lines[3] == "| Joint | 0.500 |"


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
    assert trainer_name("CSA", budget=(3, 7)) == "nnUNetTrainerCSA_3epochs_7its"  # any budget
    with pytest.raises(BenchmarkError, match="whole numbers of at least 1"):
        trainer_name("CSA", budget=(0, 5))
    with pytest.raises(BenchmarkError, match="unknown row"):
        trainer_name("Bogus")


def test_error_from_log_takes_the_last_exception_line():
    log = "Using device: cpu\nTraceback (most recent call last):\n  File x\nRuntimeError: Could not find X\n\n"
    assert error_from_log(log) == "RuntimeError: Could not find X"
    assert error_from_log("a\nlast words\n") == "last words"
    assert error_from_log("") == "no output"


def test_test_set_adds_the_other_modality_of_held_out_patients_only(tmp_path):
    raw = tmp_path / "Dataset993_X"
    (raw / "imagesOtherModality").mkdir(parents=True)
    (raw / "labelsOtherModality").mkdir()
    other = {"p1_C0": {"modality": "C0", "patient": "p1"}, "p2_LGE": {"modality": "LGE", "patient": "p2"},
             "p3_LGE": {"modality": "LGE", "patient": "p3"}}
    (raw / "dataset.json").write_text(json.dumps({"csa_other_modality_cases": other}))
    for case in other:
        (raw / "imagesOtherModality" / f"{case}_0000.nii.gz").write_bytes(b"")
        (raw / "labelsOtherModality" / f"{case}.nii.gz").write_bytes(b"")
    validation = ["p2_C0", "p1_LGE"]  # p3 trained: its other modality is no test case

    test_set = scoring.fold_test_set(validation, {"p1_LGE": "LGE", "p2_C0": "C0"}, {"p1_LGE": "p1", "p2_C0": "p2"},
                                       "/gt", str(raw), ".nii.gz")

    assert test_set.cases == ["p1_C0", "p1_LGE", "p2_C0", "p2_LGE"]
    assert test_set.validation_cases == ["p1_LGE", "p2_C0"]
    assert test_set.case_modality == {"p1_C0": "C0", "p1_LGE": "LGE", "p2_C0": "C0", "p2_LGE": "LGE"}
    assert test_set.case_patient == {"p1_C0": "p1", "p1_LGE": "p1", "p2_C0": "p2", "p2_LGE": "p2"}
    assert [test_set.source(c) for c in test_set.cases] == ["other_modality", "validation", "validation",
                                                            "other_modality"]
    assert test_set.references["p1_LGE"] == "/gt/p1_LGE.nii.gz"
    assert test_set.references["p1_C0"] == str(raw / "labelsOtherModality" / "p1_C0.nii.gz")
    assert test_set.other_modality_images["p2_LGE"] == str(raw / "imagesOtherModality" / "p2_LGE_0000.nii.gz")

    # a paired dataset (no key) or no raw folder: the validation cases alone
    assert scoring.fold_test_set(validation, {"p1_LGE": "LGE", "p2_C0": "C0"}, {}, "/gt", None,
                                   ".nii.gz").cases == ["p1_LGE", "p2_C0"]
    # a case name from dataset.json that is a path would read outside the dataset
    (raw / "dataset.json").write_text(json.dumps({"csa_other_modality_cases": {
        "../../p1_C0": {"modality": "C0", "patient": "p1"}}}))
    with pytest.raises(ModalityTagError, match="not a plain file name"):
        scoring.fold_test_set(validation, {"p1_LGE": "LGE", "p2_C0": "C0"}, {"p1_LGE": "p1", "p2_C0": "p2"}, "/gt",
                                str(raw), ".nii.gz")
    (raw / "dataset.json").write_text(json.dumps({"csa_other_modality_cases": other}))
    (raw / "labelsOtherModality" / "p2_LGE.nii.gz").unlink()
    with pytest.raises(BenchmarkError, match=r"p2_LGE.nii.gz is listed under 'csa_other_modality_cases'.*--overwrite"):
        scoring.fold_test_set(validation, {"p1_LGE": "LGE", "p2_C0": "C0"}, {"p1_LGE": "p1", "p2_C0": "p2"}, "/gt",
                                str(raw), ".nii.gz")


def test_single_equal_data_budget_halves_the_iterations():
    assert benchmark_rows.row_budget("Single", (30, 20), 2, "equal-data") == (30, 10)
    assert benchmark_rows.row_budget("Single", (30, 20), 2) == (30, 20)
    assert benchmark_rows.row_budget("CSA", (30, 20), 2, "equal-data") == (30, 20)
    with pytest.raises(BenchmarkError, match="equal-data needs a --budget"):
        benchmark_rows.row_budget("Single", None, 2, "equal-data")


def test_the_report_says_single_had_equal_data_from_the_setting_even_when_single_is_its_only_row():
    # a report of `--rows Single --single-budget equal-data` said "equal iterations": it compared
    # Single's iterations with the first row's, which was Single's own
    assert report.single_budget_clause("equal-data") == ", here for 1/n of the iterations: equal data"
    assert report.single_budget_clause("equal-iterations") == ", here for the same iterations: equal iterations"


def test_smallest_two_sided_wilcoxon_p():
    from scipy import stats
    for n in (2, 3, 6):
        assert tables.smallest_two_sided_p(n) == pytest.approx(stats.wilcoxon(np.arange(1, n + 1)).pvalue)


def test_a_rerun_keeps_each_trainers_first_timing_unless_retimed(tmp_path):
    cache = str(tmp_path / runner.TIMING_FILE)
    measured = []

    def measure(trainer):
        measured.append(trainer)
        if trainer == "broken":
            return {"trainer": trainer, "error": "boom"}
        return {"trainer": trainer, "iterations": 10, "seconds_per_iteration_median": float(len(measured))}

    first = runner.kept_or_new_timings([("Joint", "a"), ("CSA", "b"), ("X", "broken")], cache, 10, False, measure)
    assert measured == ["a", "b", "broken"] and first["CSA"]["seconds_per_iteration_median"] == 2.0
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d", first["Joint"]["measured_at"])
    # a rerun keeps the timings (a failed one is measured again), with their dates
    again = runner.kept_or_new_timings([("Joint", "a"), ("CSA", "b"), ("X", "broken")], cache, 10, False, measure)
    assert measured == ["a", "b", "broken", "broken"] and again["CSA"] == first["CSA"]
    # --retime measures again and replaces the record
    retimed = runner.kept_or_new_timings([("CSA", "b")], cache, 10, True, measure)
    assert measured[-1] == "b" and retimed["CSA"]["seconds_per_iteration_median"] == 5.0
    assert runner.kept_or_new_timings([("CSA", "b")], cache, 10, False, measure)["CSA"] == retimed["CSA"]
    # another number of timed iterations is another measurement
    runner.kept_or_new_timings([("Joint", "a")], cache, 20, False, measure)
    assert measured[-1] == "a"


def _trained_model(tmp_path, row: str) -> tuple[benchmark_rows.Model, object]:
    """A row's model of fold 0 (a stand-in checkpoint) and its fold folder."""
    fold_folder = tmp_path / "fold_0"
    fold_folder.mkdir()
    (fold_folder / "checkpoint_final.pth").write_bytes(b"weights 1")
    return benchmark_rows.Model(row, f"nnUNetTrainer{row}", None, str(fold_folder), str(tmp_path / "train.log"),
                                str(tmp_path / "predictions"), 0), fold_folder


def test_other_modality_predictions_are_kept_only_for_the_same_checkpoint_and_cases(tmp_path, monkeypatch):
    model, fold_folder = _trained_model(tmp_path, "CSA")
    images = {}
    for case in ("p1_C0", "p2_C0"):
        images[case] = str(tmp_path / f"{case}_0000.nii.gz")
        open(images[case], "w").close()
    test_set = scoring.TestSet({c: "C0" for c in images}, {"p1_C0": "p1", "p2_C0": "p2"}, {}, images)
    predicted = []

    def fake_predictor(model_folder, fold, input_folder, output_folder, device, overrides, log):
        assert model_folder == str(tmp_path) and fold == 0 and overrides["nnUNet_csa_modality"] == "C0"
        inputs = sorted(os.listdir(input_folder))
        for image in inputs:
            with open(os.path.join(output_folder, image.replace("_0000.nii.gz", ".nii.gz")), "w") as f:
                f.write(str(len(predicted)))
        predicted.append(inputs)

    monkeypatch.setattr(runner, "predict_folder", fake_predictor)
    (tmp_path / "logs").mkdir()

    def predict(test_set=test_set):
        result = benchmark_rows.RowResult("CSA", [model])
        runner.predict_other_modality(result, test_set, "1", "2d", "nnUNetPlans", 0, "cpu", {}, str(tmp_path),
                                      ".nii.gz")
        assert not result.failed, result.error

    predict()
    predict()  # same checkpoint, same cases: kept
    assert len(predicted) == 1
    (fold_folder / "checkpoint_final.pth").write_bytes(b"weights 2")  # trained again
    predict()
    assert len(predicted) == 2 and (tmp_path / "predictions" / "p1_C0.nii.gz").read_text() == "1"
    os.remove(tmp_path / "predictions" / "p2_C0.nii.gz")  # an output gone
    predict()
    assert len(predicted) == 3
    one_case = scoring.TestSet({"p1_C0": "C0"}, {"p1_C0": "p1"}, {}, {"p1_C0": images["p1_C0"]})
    predict(one_case)  # other cases: predicted again (those alone), the stale record replaced
    assert predicted[-1] == ["p1_C0_0000.nii.gz"] and len(predicted) == 4
    with open(tmp_path / "predictions" / "predicted_with_C0.json") as f:
        assert json.load(f)["cases"] == ["p1_C0"]

    # a prediction that fails: the row fails with its error, and no record claims the outputs
    monkeypatch.setattr(runner, "predict_folder", lambda *args: "RuntimeError: boom")
    (fold_folder / "checkpoint_final.pth").write_bytes(b"weights 3")
    result = benchmark_rows.RowResult("CSA", [model])
    runner.predict_other_modality(result, test_set, "1", "2d", "nnUNetPlans", 0, "cpu", {}, str(tmp_path), ".nii.gz")
    assert result.failed and "RuntimeError: boom" in result.error
    assert not (tmp_path / "predictions" / "predicted_with_C0.json").exists()


def test_other_modality_prediction_gets_every_channel_of_a_case(tmp_path, monkeypatch):
    model, _ = _trained_model(tmp_path, "Joint")
    for name in ("p1_C0_0000.nii.gz", "p1_C0_0001.nii.gz", "p10_C0_0000.nii.gz"):  # p10: another case
        (tmp_path / name).write_bytes(b"")
    test_set = scoring.TestSet({"p1_C0": "C0"}, {"p1_C0": "p1"}, {}, {"p1_C0": str(tmp_path / "p1_C0_0000.nii.gz")})
    inputs = []
    monkeypatch.setattr(runner, "predict_folder", lambda model_folder, fold, input_folder, *rest:
                        inputs.append(sorted(os.listdir(input_folder))))
    (tmp_path / "logs").mkdir()
    runner.predict_other_modality(benchmark_rows.RowResult("Joint", [model]), test_set, "1", "2d", "nnUNetPlans", 0,
                                  "cpu", {}, str(tmp_path), ".nii.gz")
    assert inputs == [["p1_C0_0000.nii.gz", "p1_C0_0001.nii.gz"]]


def test_data_source_names_a_phantom_and_a_real_conversion():
    phantom = {"description": "SYNTHETIC ...", "csa_conversion": {
        "converter": "MyoPS 2020", "source": "/x",
        "phantom": {"generator": "nnunetv2_csa.tools.phantom", "layout": "myops", "n_patients": 10, "seed": 0}}}
    text = report.data_source_text(phantom)
    assert text.startswith("SYNTHETIC phantom images") and "MyoPS 2020 layout (n_patients 10, seed 0)" in text
    real = {"description": "MyoPS 2020 multi-sequence cardiac MR", "reference": "Zhuang and Li 2020",
            "csa_conversion": {"converter": "MyoPS 2020", "source": "/data/myops2020/train", "phantom": None}}
    assert report.data_source_text(real) == ("MyoPS 2020: MyoPS 2020 multi-sequence cardiac MR (Zhuang and Li "
                                                "2020), converted from `/data/myops2020/train`.")
    assert "no converter record" in report.data_source_text({"name": "Dataset123_X"})


def _row(name, status="ok", error=""):
    row = benchmark_rows.RowResult(name, [benchmark_rows.Model(name, f"tr{name}", None, "/x", "/log")], status=status)
    row.error = error
    return row


def test_a_row_failed_in_one_fold_fails_as_a_whole():
    runs = [scoring.FoldRun(0, scoring.TestSet({}, {}, {}), [_row("Joint"), _row("CSA")], []),
            scoring.FoldRun(1, scoring.TestSet({}, {}, {}), [_row("Joint"), _row("CSA", "failed", "boom")], [])]
    merged = {r.row: r for r in pipeline.merge_fold_rows(runs)}
    assert merged["Joint"].status == "ok" and len(merged["Joint"].models) == 2
    assert merged["CSA"].failed and merged["CSA"].error == "fold 1: boom"


def test_test_sets_of_folds_must_not_share_a_case():
    a = scoring.TestSet({"p1_LGE": "LGE"}, {"p1_LGE": "p1"}, {"p1_LGE": "/a"})
    b = scoring.TestSet({"p2_C0": "C0"}, {"p2_C0": "p2"}, {"p2_C0": "/b"})
    assert scoring.merge_test_sets([a, b]).cases == ["p1_LGE", "p2_C0"]
    with pytest.raises(BenchmarkError, match="held out by more than one"):
        scoring.merge_test_sets([a, a])


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


def expected_test_cases(env, dataset_name) -> dict:
    """case -> source: the validation cases of folds 0 and 1 and the other modality of their patients."""
    with open(os.path.join(env["nnUNet_preprocessed"], dataset_name, "splits_final.json")) as f:
        splits = json.load(f)
    validation = [c for fold in FOLDS for c in splits[fold]["val"]]
    assert len(validation) == len(set(validation))  # every held-out patient once
    with open(os.path.join(env["nnUNet_raw"], dataset_name, "dataset.json")) as f:
        dataset_json = json.load(f)
    held_out = {dataset_json["csa_case_patient"][c] for c in validation}
    other = [c for c, tag in dataset_json["csa_other_modality_cases"].items() if tag["patient"] in held_out]
    assert len(held_out) == 4 and len(other) == 4
    return {**{c: "validation" for c in validation}, **{c: "other_modality" for c in other}}


@pytest.fixture(scope="module")
def benchmark_run(tiny_preprocessed_dataset, tmp_path_factory):
    env, dataset_name = tiny_preprocessed_dataset
    plans_variant(env, dataset_name, PLANS, width_divisor=8)
    report = tmp_path_factory.mktemp("benchmark") / "report"
    result = run_command(["nnUNetv2_csa_benchmark", "-d", str(UNPAIRED_DATASET_ID), "-p", PLANS, "--budget", *BUDGET,
                          "--folds", *map(str, FOLDS), "--rows", *RUN_ROWS, "-device", "cpu", "--timing-iterations",
                          "2", "-o", str(report)],
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
    assert ("8 cases (4 LGE, 4 C0) of the 4 patients that folds 0, 1 of `splits_final.json` hold out, each scored "
            "once") in text
    assert "# CSA benchmark: Dataset993_MSCMRSeg2019, folds 0, 1 (cross-validation, pooled)" in text
    assert "the other modality of the same patients" in text
    assert "predicted by this benchmark with nnU-Net's predictor at the defaults of `nnUNetv2_predict`" in text

    for modality in MODALITIES:
        tables = _markdown_tables(_section(text, f"### {modality} "))
        assert len(tables) == 2  # Dice + HD, then HD95 + ASSD
        for table in tables:
            assert [cells[0] for cells in table] == RUN_ROW_LABELS
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

    for modality in MODALITIES:  # per fold: one column per fold, every row
        section = _section(text, "## Per fold")
        table = _markdown_tables(section.split(f"{modality}:", 1)[1])[0]
        assert [cells[0] for cells in table] == RUN_ROW_LABELS
        assert all(0 <= float(c.replace("**", "")) <= 1 for cells in table for c in cells[1:])
        assert "| Method | fold 0 | fold 1 |" in section

    wilcoxon_section = _section(text, "## Wilcoxon")
    assert "Holm's step-down method over all 6 tests" in wilcoxon_section
    assert "Smallest p an exact test can reach: n=4: 0.12" in wilcoxon_section
    wilcoxon = _markdown_tables(wilcoxon_section)[0]
    assert [cells[0] for cells in wilcoxon] == ["CSA vs Joint"]
    for cells in wilcoxon:
        assert len(cells) == 1 + 3 * len(MODALITIES)  # Dice, HD, HD95 per modality
        for cell in cells[1:]:
            match = re.match(r"([\d.e-]+) \(Holm ([\d.e-]+); n=4, Δ=([+-][\d.]+) \[([+-][\d.]+), ([+-][\d.]+)\]", cell)
            if match is None:  # identical predictions: no interval, p = 1
                assert "all differences are zero" in cell, cell
                continue
            p, holm, delta, low, high = map(float, match.groups())
            assert 0 < p <= holm <= 1 and low <= delta <= high, cell

    timing = _markdown_tables(_section(text, "## Training cost"))[0]
    assert [cells[0] for cells in timing] == RUN_ROWS
    by_row = {cells[0]: cells for cells in timing}
    assert by_row["Joint"][1] == "nnUNetTrainerJoint_1epochs_5its"
    for cells in timing:
        assert float(cells[2]) > 0 and float(cells[3]) > 0
        # the ratio column is this row's median over Joint's, at the table's precision (3 significant
        # digits of each median, 2 decimals of the ratio)
        assert abs(float(cells[4]) - float(cells[2]) / float(by_row["Joint"][2])) <= 0.005 + 0.011 * float(cells[4])
        assert float(cells[5]) >= 0
        assert float(cells[7]) > 0  # epoch-end overhead (s)
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d", cells[8])  # when it was measured
    assert "MSBN logs its CSA term on the validation batches, outside the timed step" in text


@pytest.mark.integration
def test_results_csv_and_json_are_complete_and_finite(benchmark_run):
    env, dataset_name, report, _ = benchmark_run
    df = pd.read_csv(report / "results.csv")
    assert list(df.columns) == list(RESULT_COLUMNS)
    case_source = expected_test_cases(env, dataset_name)
    test_cases = sorted(case_source)
    assert sorted(df["row"].unique()) == sorted(RUN_ROWS)
    assert len(df) == len(RUN_ROWS) * len(test_cases) * len(CLASSES)
    for row in RUN_ROWS:
        assert sorted(df.loc[df["row"] == row, "case"].unique()) == test_cases
    assert dict(zip(df["case"], df["source"])) == case_source
    # each held-out patient is scored in both modalities, so the Wilcoxon test pairs 4 patients per modality
    assert (df.groupby("modality")["patient"].nunique() == 4).all()
    assert sorted(df["fold"].unique()) == FOLDS
    assert (df.groupby("patient")["fold"].nunique() == 1).all()  # a patient is scored by one fold's models
    for row in RUN_ROWS:
        for case, source in case_source.items():
            if source == "other_modality":
                modality = case.rsplit("_", 1)[1]
                scored = df.loc[(df["row"] == row) & (df["case"] == case)].iloc[0]
                trainer, fold = scored["trainer"], scored["fold"]
                assert (report / "predictions" / f"fold_{fold}" / trainer / f"{case}.nii.gz").is_file()
                assert (report / "logs" / f"predict_{trainer}_{modality}_fold{fold}.log").is_file()
    assert np.isfinite(df[["dice", "hd", "hd95", "assd"]].to_numpy()).all()
    assert df["dice"].between(0, 1).all() and (df["hd"] >= df["hd95"] - 1e-9).all()
    assert set(df.loc[df["case"].str.endswith("_LGE"), "modality"]) == {"LGE"}

    def no_nan(value):
        raise AssertionError(f"results.json holds {value}")
    with open(report / "results.json") as f:
        summary = json.load(f, parse_constant=no_nan)
    assert [r["status"] for r in summary["rows"]] == ["ok"] * len(RUN_ROWS)
    assert len(summary["cases"]) == len(df) and summary["budget"] == {"epochs": 1, "iterations_per_epoch": 5}
    assert summary["test_cases"]["case_source"] == case_source and summary["folds"] == FOLDS


@pytest.mark.integration
def test_every_rows_checkpoint_loads_without_full_pickle(benchmark_run):
    from nnunetv2_csa.checkpoints import load_checkpoint
    env, dataset_name, _, _ = benchmark_run
    results = os.path.join(env["nnUNet_results"], dataset_name)
    trainers = {folder.split("__")[0] for folder in os.listdir(results) if "__" in folder}
    assert {"nnUNetTrainerJoint_1epochs_5its", "nnUNetTrainerCSA_1epochs_5its"} <= trainers
    for folder in os.listdir(results):
        checkpoint = os.path.join(results, folder, "fold_0", "checkpoint_final.pth")
        if os.path.isfile(checkpoint):
            assert load_checkpoint(checkpoint)["trainer_name"] == folder.split("__")[0]


@pytest.mark.integration
def test_joint_reports_its_pseudo_dice_and_final_validation_per_modality(benchmark_run):
    from nnunetv2_csa.checkpoints import load_checkpoint
    env, dataset_name, _, _ = benchmark_run
    fold = os.path.join(env["nnUNet_results"], dataset_name, f"nnUNetTrainerJoint_1epochs_5its__{PLANS}__2d",
                        "fold_0")
    logged = load_checkpoint(os.path.join(fold, "checkpoint_final.pth"))["logging"]
    assert np.array(logged["mean_fg_dice_per_modality"]).shape == (1, len(MODALITIES))
    log_text = "".join(open(os.path.join(fold, f)).read() for f in os.listdir(fold) if f.startswith("training_log"))
    number = r"(?:nan|\d\.\d+|[01])"
    assert re.search(rf"Pseudo dice per modality \{{'LGE': {number}, 'C0': {number}\}}", log_text)
    with open(os.path.join(fold, "validation", "summary_per_modality.json")) as f:
        per_modality = json.load(f)
    # the unpaired split holds out one patient, so one case, of each modality per fold
    assert {name: entry["n_cases"] for name, entry in per_modality.items()} == {"LGE": 1, "C0": 1}
    assert all(0.0 <= entry["mean_Dice"] <= 1.0 for entry in per_modality.values())


@pytest.mark.integration
def test_plots_are_written(benchmark_run):
    _, _, report, _ = benchmark_run
    files = ["dice_boxplots.png", "overlay.png", "paired_differences.png"] + [f"training_curves_{row}.png"
                                                                            for row in RUN_ROWS]
    for name in files:
        data = (report / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name


@pytest.mark.integration
def test_rerun_skips_finished_rows_and_a_failing_row_is_reported(benchmark_run, tmp_path, monkeypatch, capsys):
    env, dataset_name, report, _ = benchmark_run
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer", "nnUNet_def_n_proc",
                "nnUNet_compile"):
        monkeypatch.setenv(key, env[key])
    # a row whose training command fails (as nnU-Net's does, with the error last in its output); the
    # other rows' models are reused, so no other command runs
    def failing_training(name, arguments, log, env):
        assert name == "nnUNetv2_train" and "nnUNetTrainerMSBN_1epochs_5its" in arguments
        log.write("Traceback (most recent call last):\nRuntimeError: Could not find requested nnunet trainer\n")
        return subprocess.CompletedProcess([name], 1)
    monkeypatch.setattr(runner, "run_console", failing_training)
    results = os.path.join(env["nnUNet_results"], dataset_name)
    checkpoints = {name: os.path.getmtime(os.path.join(results, f"{name}__{PLANS}__2d", "fold_0",
                                                       "checkpoint_final.pth"))
                   for name in ("nnUNetTrainerJoint_1epochs_5its", "nnUNetTrainerCSA_1epochs_5its")}
    second = tmp_path / "second"
    # the first run's fold-0 predictions, where a one-fold report keeps them: the same checkpoints
    # and cases, so the rerun keeps them instead of predicting again
    shutil.copytree(report / "predictions" / "fold_0", second / "predictions")

    pipeline.run_benchmark(UNPAIRED_DATASET_ID, plans=PLANS, budget=(1, 5), rows=["Joint", "MSBN", "CSA"],
                           device="cpu", report_folder=str(second), timing_iterations=0)

    stdout = capsys.readouterr().out
    assert "Joint: nnUNetTrainerJoint_1epochs_5its is trained and validated already: skipped" in stdout
    assert "CSA: nnUNetTrainerCSA_1epochs_5its is trained and validated already: skipped" in stdout
    for row, modality in (("Joint", "LGE"), ("Joint", "C0"), ("CSA", "LGE"), ("CSA", "C0")):
        assert (f"{row}: {modality} other-modality predictions of nnUNetTrainer{row}_1epochs_5its kept (same "
                f"checkpoint and cases)") in stdout
    for name, mtime in checkpoints.items():
        checkpoint = os.path.join(results, f"{name}__{PLANS}__2d", "fold_0", "checkpoint_final.pth")
        assert os.path.getmtime(checkpoint) == mtime
        assert not (second / "logs" / f"train_{name}.log").exists()

    text = (second / "report.md").read_text()
    for modality in MODALITIES:
        dice_table = _markdown_tables(_section(text, f"### {modality} "))[0]
        # the first cell names the row and its norm: "MSBN (IN per modality)"
        by_row = {cells[0].split(" (")[0]: cells for cells in dice_table}
        assert [cells[0] for cells in dice_table] == ["Joint (IN shared)", "MSBN (IN per modality)",
                                                      "CSA (IN per modality)"]
        assert by_row["MSBN"][1].startswith("FAILED: training nnUNetTrainerMSBN_1epochs_5its exited 1")
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
def test_each_rows_timing_is_the_timing_commands_json_and_leaves_its_trained_model_alone(benchmark_run):
    """The benchmark times each row with ``python -m nnunetv2_csa.tools.timing`` in a process of its
    own (runner.time_trainer) and keeps the JSON line it prints; the timed trainer works in a
    temporary nnUNet_results, so the row's trained model folder gains no training log."""
    env, dataset_name, report, _ = benchmark_run
    with open(report / runner.TIMING_FILE) as f:
        timings = json.load(f)
    timed = {trainer_name(row, budget=(1, 5), modality_index=0) for row in RUN_ROWS}
    assert set(timings) == timed
    for trainer, timing in timings.items():
        assert (report / "logs" / f"timing_{trainer}.log").is_file()
        assert timing["trainer"] == trainer and timing["iterations"] == 2 and len(timing["seconds_per_iteration"]) == 2
        assert 0 < timing["seconds_per_iteration_median"] < 60 and timing["batch_size"] >= 2
        assert timing["peak_memory_kind"] == "cpu_peak_rss_increase" and timing["peak_memory_bytes"] >= 0
        # 3 epoch ends at most, and no more than the trainer has (1): nnU-Net's learning-rate schedule ends there
        assert len(timing["epoch_end_seconds"]) == 1 and timing["epoch_end_seconds"][0] > 0
        fold = os.path.join(env["nnUNet_results"], dataset_name, f"{trainer}__{PLANS}__2d", "fold_0")
        assert len([f for f in os.listdir(fold) if f.startswith("training_log_")]) == 1, os.listdir(fold)

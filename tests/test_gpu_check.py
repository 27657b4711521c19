"""scripts/gpu_check.sh: its CPU dry run (so the GPU script cannot rot) and its command lookup."""
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.sh")


def _load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(ROOT, "scripts", "gpu_check.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.integration
def test_dry_run_in_two_calls_trains_the_three_rows_measures_them_and_checks_the_exports(tmp_path):
    """As on a GPU, where the check spans two device calls: Joint and MSBN, then CSA and the report."""
    work = tmp_path / "work"
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONWARNINGS": "ignore",
           "nnUNet_def_n_proc": "1"}  # as conftest.py, why there
    env.pop("OUT", None)

    def dry_run(out, rows):
        completed = subprocess.run(["bash", SCRIPT, "--dry-run", "--out", str(out), "--work", str(work),
                                    "--rows", *rows], env=env, capture_output=True, text=True, timeout=900)
        log = out / "gpu_check.log"
        assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:] + (
            log.read_text()[-3000:] if log.exists() else "")
        return completed.stdout

    first = dry_run(tmp_path / "out1", ["Joint", "MSBN"])
    assert f"--work {work} --rows CSA" in first  # says how to finish
    assert not (tmp_path / "out1" / "gpu_check.json").exists()
    assert {p.name for p in (tmp_path / "out1").glob("train_*.json")} == {"train_Joint.json", "train_MSBN.json"}
    out = tmp_path / "out2"
    second = dry_run(out, ["CSA"])
    assert f"reusing the data converted and planned in {work}" in second

    result = json.loads((out / "gpu_check.json").read_text())
    assert result["dry_run"] is True and result["data"]["source"].startswith("phantom")
    assert set(result["trainers"]) == {"Joint", "MSBN", "CSA"}
    for row, trainer in result["trainers"].items():
        assert trainer["trainer"].endswith("_1epochs_5its") and trainer["iterations"] == 5
        assert trainer["nonfinite_training_losses"] == 0 and trainer["first_nonfinite_step"] is None
        assert trainer["compiled"] is False and trainer["device"] == "cpu"  # nnU-Net never compiles on CPU
        assert 0 < trainer["seconds_per_iteration_median_last"] < 600 and trainer["timing_window"] == 4
        assert set(trainer["unique_graphs"]) == {"after_first_epoch", "after_training", "after_final_validation"}
        assert all(0 <= v <= 1 for v in trainer["validation_mean_dice"].values())
    # the modality-specific rows report nnU-Net's final validation per modality
    assert set(result["trainers"]["CSA"]["validation_mean_dice"]) == {"C0", "LGE"}
    # the profiler found the labelled term: inside CSA's step, never evaluated in MSBN's (λ = 0), absent in Joint
    assert 0 < result["trainers"]["CSA"]["consistency_forward_share_profiled"] < 1
    assert result["trainers"]["MSBN"]["consistency_forward_share_profiled"] == 0
    assert result["trainers"]["Joint"]["consistency_forward_share_profiled"] is None
    exports = result["export_check"]
    assert set(exports) == {"C0", "LGE"}
    assert all(c["cases"] > 0 and c["differing_voxels"] == 0 and c["identical"] for c in exports.values())
    summary = result["summary"]
    assert math.isfinite(summary["step_time_ratio_CSA_to_Joint"]) and summary["peak_memory_ratio_CSA_to_Joint"] is None
    assert summary["goals"]["exported modalities predict identically"] is True
    assert summary["goals"]["no graph compiled after the first epoch"] is None  # a GPU goal: not judged on CPU
    assert summary["goals"]["every training loss finite (AMP skips the update of a non-finite step)"] is True
    report = (out / "gpu_check.md").read_text()
    assert "dry run" in report and "| CSA | off |" in report and "not evaluated (CPU dry run)" in report


def test_a_call_stopped_before_the_data_were_ready_is_redone_over_its_half_made_dataset(tmp_path, monkeypatch):
    """A device call stopped after converting and before planning ended leaves no marker; the
    next call with the same --work converts again with --overwrite (else the converter refuses
    the existing dataset), and once the marker is written a call converts nothing."""
    gpu_check = _load_gpu_check()
    calls = []
    monkeypatch.setattr(gpu_check, "run", lambda name, args, log, env=None: calls.append((name, list(args))))
    (tmp_path / "nnUNet_raw" / "Dataset990_MyoPS2020" / "imagesTr").mkdir(parents=True)  # the stopped call's data
    with open(tmp_path / "log.txt", "w") as log:
        first = gpu_check.prepare_dataset(str(tmp_path), True, log)
        assert [name for name, _ in calls] == ["nnUNetv2_csa_phantom", "nnUNetv2_csa_convert_myops",
                                               "nnUNetv2_plan_and_preprocess"]
        assert "--overwrite" in calls[1][1]
        calls.clear()
        assert gpu_check.prepare_dataset(str(tmp_path), True, log) == first and calls == []

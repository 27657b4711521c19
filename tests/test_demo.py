"""The README's main job, end to end on phantom data at a tiny budget."""
import os

import pandas as pd
import pytest

from conftest import run_command

pytestmark = pytest.mark.integration


def test_demo_runs_end_to_end_and_a_3d_fullres_run_reuses_the_data_and_conversion(tmp_path):
    output = tmp_path / "demo"
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}
    env.update(nnUNet_n_proc_DA="0", nnUNet_compile="false")
    args = ["nnUNetv2_csa_demo", "--output", str(output), "--budget", "1", "5", "--phantom-patients", "5",
            "--dataset-id", "992"]
    first = run_command(args + ["--timing-iterations", "2"], env, timeout=1500)
    report = output / "report"
    assert "**Data.** SYNTHETIC phantom images written by `nnUNetv2_csa_phantom`" in (report / "report.md").read_text()
    results = pd.read_csv(report / "results.csv")
    assert set(results["row"]) == {"Joint", "CSA"}
    assert set(results["modality"]) == {"LGE", "C0"}
    assert "mean Dice over classes" in first.stdout and "report.md" in first.stdout
    assert (output / "logs" / "plan.log").is_file()  # nnU-Net's verbose output goes to the log folder
    assert any(p.endswith(".png") for p in os.listdir(report))

    # a second run in 3d_fullres into the same folder: data and conversion are reused, the 3D plan and
    # report are its own (the 2d report is left as it was). The CSA row alone: Joint's 3D code is the
    # per-modality validation CSA runs too, and tests/test_resenc_and_3d.py trains 3D end to end
    dice_2d = (report / "results.csv").read_bytes()
    second = run_command(args + ["-c", "3d_fullres", "--timing-iterations", "0", "--rows", "CSA"], env, timeout=900)
    assert "1/4 data: phantom present, reused" in second.stdout
    assert "2/4 convert: done before, reused" in second.stdout
    assert "3/4 plan and preprocess (nnU-Net, 3d_fullres)" in second.stdout
    assert (output / "logs" / "plan_3d_fullres.log").is_file()
    report_3d = output / "report_3d_fullres"
    assert "configuration `3d_fullres`" in (report_3d / "report.md").read_text()
    results_3d = pd.read_csv(report_3d / "results.csv")
    assert set(results_3d["row"]) == {"CSA"} and set(results_3d["modality"]) == {"LGE", "C0"}
    assert results_3d["dice"].between(0, 1).all()
    models = os.listdir(output / "nnUNet_results" / os.listdir(output / "nnUNet_results")[0])
    assert "nnUNetTrainerCSA_1epochs_5its__nnUNetPlans__3d_fullres" in models
    assert "nnUNetTrainerJoint_1epochs_5its__nnUNetPlans__3d_fullres" not in models
    assert (report / "results.csv").read_bytes() == dice_2d

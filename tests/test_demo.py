"""The README's main job, end to end on phantom data at a tiny budget."""
import os

import pandas as pd
import pytest

from conftest import run_command

pytestmark = pytest.mark.integration


def test_demo_runs_end_to_end_and_reuses_finished_stages(tmp_path):
    output = tmp_path / "demo"
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}
    env.update(nnUNet_n_proc_DA="0", nnUNet_compile="false")
    args = ["nnUNetv2_csa_demo", "--output", str(output), "--budget", "1", "5", "--timing-iterations", "2",
            "--phantom-patients", "5", "--dataset-id", "992"]
    first = run_command(args, env, timeout=1500)
    report = output / "report"
    assert "**Data.** SYNTHETIC phantom images written by `nnUNetv2_csa_phantom`" in (report / "report.md").read_text()
    results = pd.read_csv(report / "results.csv")
    assert set(results["row"]) == {"Joint", "CSA"}
    assert set(results["modality"]) == {"LGE", "C0"}
    assert "mean Dice over classes" in first.stdout and "report.md" in first.stdout
    assert (output / "logs" / "plan.log").is_file()  # nnU-Net's verbose output goes to the log folder
    assert any(p.endswith(".png") for p in os.listdir(report))

    second = run_command(args, env, timeout=900)
    assert "convert: done before, reused" in second.stdout
    assert "plan and preprocess: done before, reused" in second.stdout

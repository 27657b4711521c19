"""The README's main job, end to end on phantom data at a tiny budget; and which stages a
rerun of the demo (same or other configuration) reuses."""
import os

import pandas as pd
import pytest

from conftest import run_command
from nnunetv2_csa.tools import demo

SINGLE_TRAINERS = ("nnUNetTrainerSingleModality0_1epochs_5its", "nnUNetTrainerSingleModality1_1epochs_5its")


@pytest.mark.integration
def test_demo_runs_end_to_end_and_a_rerun_reuses_every_finished_stage(tmp_path):
    output = tmp_path / "demo"
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}
    env.update(nnUNet_n_proc_DA="0", nnUNet_compile="false", nnUNet_def_n_proc="1")  # as conftest.py, why there
    # the Single row alone (two models, one per modality, a fold's predictions put together per
    # modality); Joint, CSA, the timing and two folds run end to end in tests/test_benchmark.py,
    # 3d_fullres in tests/test_resenc_and_3d.py, through the same benchmark code
    args = ["nnUNetv2_csa_demo", "--output", str(output), "--budget", "1", "5", "--phantom-patients", "5",
            "--dataset-id", "992", "--rows", "Single", "--timing-iterations", "0"]
    first = run_command(args, env, timeout=1500)
    report = output / "report"
    assert "**Data.** SYNTHETIC phantom images written by `nnUNetv2_csa_phantom`" in (report / "report.md").read_text()
    results = pd.read_csv(report / "results.csv")
    assert set(results["row"]) == {"Single"} and results["dice"].between(0, 1).all()
    # each modality is scored with the model trained on it alone (the demo's modalities: LGE, then C0)
    assert set(zip(results["modality"], results["trainer"])) == {("LGE", SINGLE_TRAINERS[0]),
                                                                 ("C0", SINGLE_TRAINERS[1])}
    assert "mean Dice over classes" in first.stdout and "report.md" in first.stdout
    assert (output / "logs" / "plan.log").is_file()  # nnU-Net's verbose output goes to the log folder
    assert (report / "training_curves_Single.png").is_file()

    checkpoints = {trainer: next(output.glob(f"nnUNet_results/*/{trainer}__nnUNetPlans__2d/fold_0/"
                                             "checkpoint_final.pth")) for trainer in SINGLE_TRAINERS}
    trained_at = {trainer: checkpoint.stat().st_mtime for trainer, checkpoint in checkpoints.items()}
    second = run_command(args, env, timeout=900)
    assert "1/4 data: phantom present, reused" in second.stdout
    assert "2/4 convert: done before, reused" in second.stdout
    assert "3/4 plan and preprocess (2d): done before, reused" in second.stdout
    for trainer, checkpoint in checkpoints.items():
        assert f"Single: {trainer} is trained and validated already: skipped" in second.stdout
        assert checkpoint.stat().st_mtime == trained_at[trainer]
    assert pd.read_csv(report / "results.csv").equals(results)


def test_a_3d_fullres_rerun_reuses_data_and_conversion_and_plans_and_reports_apart(tmp_path, monkeypatch, capsys):
    """The demo's stages for a second configuration, with nnU-Net's commands and the benchmark
    stubbed (both run for real in the test above and in tests/test_resenc_and_3d.py)."""
    from nnunetv2_csa.tools.benchmark import pipeline

    commands, benchmarks = [], []
    monkeypatch.setattr(demo, "make_phantom", lambda folder, n, size: os.makedirs(folder))
    monkeypatch.setattr(demo, "convert", lambda layout, source, dataset_id, crop: f"Dataset{dataset_id}_X")
    monkeypatch.setattr(demo, "run_logged", lambda args, log_file: commands.append((args, os.path.basename(log_file))))
    monkeypatch.setattr(pipeline, "run_benchmark", lambda dataset_id, configuration, plans, fold, report_folder, **kw:
                        benchmarks.append((configuration, plans, os.path.basename(report_folder))) or report_folder)
    monkeypatch.setattr(demo, "summarize", lambda report: [])
    for variable in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer"):
        monkeypatch.delenv(variable, raising=False)  # run_demo sets them, monkeypatch restores them
    output = str(tmp_path / "demo")

    demo.main(["--output", output])
    assert [(args[0], args[args.index("-c") + 1], log) for args, log in commands] == [
        ("nnUNetv2_plan_and_preprocess", "2d", "plan.log")]
    assert benchmarks == [("2d", "nnUNetPlans", "report")]
    capsys.readouterr()

    demo.main(["--output", output, "-c", "3d_fullres"])
    printed = capsys.readouterr().out
    assert "1/4 data: phantom present, reused" in printed and "2/4 convert: done before, reused" in printed
    assert "3/4 plan and preprocess (nnU-Net, 3d_fullres)" in printed
    assert [(args[0], args[args.index("-c") + 1], log) for args, log in commands[1:]] == [
        ("nnUNetv2_plan_and_preprocess", "3d_fullres", "plan_3d_fullres.log")]
    assert benchmarks[1:] == [("3d_fullres", "nnUNetPlans", "report_3d_fullres")]

    demo.main(["--output", output, "-c", "3d_fullres"])  # each configuration's plan is made once
    assert "3/4 plan and preprocess (3d_fullres): done before, reused" in capsys.readouterr().out
    assert len(commands) == 2 and len(benchmarks) == 3

"""The README's "nnU-Net workflow" block, run as printed (on phantoms, a short-budget trainer and
the README's flags for a CPU machine with few cores), so that the README cannot drift from what
the commands do."""
import os
import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from conftest import nnunet_environment
from nnunetv2_csa.tools.commands import command_environment
from nnunetv2_csa.tools.phantom import write_mmwhs_phantom, write_mscmrseg_phantom, write_myops_phantom

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHORT_TRAINER = "nnUNetTrainerCSA_1epochs_5its"
#: each (as printed, as run); every one must occur in the block, so a README edit that the test
#: does not follow fails here instead of silently running something else
SUBSTITUTIONS = (
    ("pip install -e .", "true"),  # the package is installed in the test's environment
    ("export nnUNet_raw=... nnUNet_preprocessed=... nnUNet_results=...", "true"),  # set by the test
    ("/data/MSCMRSeg2019", "{mscmrseg}"),
    ("/data/MMWHS2017", "{mmwhs}"),
    ("/data/myops2020/train", "{myops}"),
    ("-tr nnUNetTrainerCSA ", f"-tr {SHORT_TRAINER} "),
    ("-tr nnUNetTrainerCSA\n", f"-tr {SHORT_TRAINER}\n"),
    ("nnUNetTrainerCSA__nnUNetPlans__2d", f"{SHORT_TRAINER}__nnUNetPlans__2d"),
)
#: the README's advice for a machine without a GPU and with few cores (2 here), per command: what the
#: test adds; each must be in the block's comments, so the test follows only what the README says
FEW_CORES_CPU_FLAGS = {"nnUNetv2_plan_and_preprocess": "-np 2 -npfp 2", "nnUNetv2_train": "-device cpu",
                       "nnUNetv2_predict": "-device cpu -npp 1 -nps 1",
                       "nnUNetv2_predict_from_modelfolder": "-device cpu -npp 1 -nps 1"}
ADVICE = ("add -np 2 -npfp 2", "add -device cpu on a machine without a GPU",
          "without a GPU add -device cpu, as for training, and with few CPU cores -npp 1 -nps 1")


def readme_workflow_block() -> str:
    with open(os.path.join(ROOT, "README.md")) as f:
        section = f.read().split("## The nnU-Net workflow with this package", 1)[1]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1)


def runnable(block: str, data: dict) -> str:
    for printed, run in SUBSTITUTIONS:
        assert printed in block, f"the README's workflow block no longer contains {printed!r}: update this test"
        block = block.replace(printed, run.format(**data))
    for advice in ADVICE:
        assert advice in block, f"the README's workflow block no longer advises {advice!r}: update this test"
    lines = []
    for line in block.splitlines():
        command = re.sub(r"^(\w+=\S+ )*", "", line).split(" ", 1)[0]
        flags = FEW_CORES_CPU_FLAGS.get(command)
        lines.append(f"{line} {flags}" if flags and "-device" not in line and "-np " not in line else line)
    return "\n".join(lines) + "\n"


def test_substitutions_leave_every_command_and_add_the_readmes_flags_for_a_few_core_cpu():
    script = runnable(readme_workflow_block(), {"mscmrseg": "/m", "mmwhs": "/w", "myops": "/y"})
    assert f"nnUNetv2_train 501 2d 0 -tr {SHORT_TRAINER} -device cpu" in script
    assert "nnUNet_csa_modality=LGE nnUNetv2_predict -d 501" in script
    assert "-o out_LGE -device cpu -npp 1 -nps 1" in script and "-o out_LGE_stock -device cpu -npp 1 -nps 1" in script
    assert "nnUNetv2_plan_and_preprocess -d 501 -c 2d --verify_dataset_integrity -np 2 -npfp 2" in script
    assert "nnUNetTrainerCSA " not in script.replace(SHORT_TRAINER, "")


@pytest.mark.integration
def test_readme_workflow_runs_as_printed(tmp_path):
    data = {"mscmrseg": str(tmp_path / "MSCMRSeg2019"), "mmwhs": str(tmp_path / "MMWHS2017"),
            "myops": str(tmp_path / "myops2020" / "train")}
    write_mscmrseg_phantom(data["mscmrseg"], 10, modalities=("C0", "LGE"), in_plane_size=48)
    write_mmwhs_phantom(data["mmwhs"], 5, size=32)
    write_myops_phantom(data["myops"], 5, in_plane_size=48)
    # the README's planning command as the package's own tools run it (nnU-Net's planner refuses an
    # nnUNet_n_proc_DA of 0, the fastest setting for training on a CPU: documentation/trainers.md)
    env = command_environment("nnUNetv2_plan_and_preprocess", nnunet_environment(tmp_path))
    env.pop("nnUNet_extTrainer")  # the block sets it itself
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    work = tmp_path / "work"
    work.mkdir()
    completed = subprocess.run(["bash", "-euo", "pipefail", "-c", runnable(readme_workflow_block(), data)],
                               cwd=work, env=env, capture_output=True, text=True, timeout=1500)
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-4000:]

    predictions = sorted(p.name for p in (work / "out_LGE").glob("*.nii.gz"))
    assert predictions and predictions == sorted(p.name for p in (work / "heldout" / "LGE" / "labels").iterdir())
    metrics = pd.read_csv(work / "eval_LGE" / "metrics.csv")
    assert sorted(metrics["case"].unique()) == [p.removesuffix(".nii.gz") for p in predictions]
    assert set(metrics["modality"]) == {"LGE"} and metrics["dice"].between(0, 1).all()
    # the exported stock model predicts what the CSA model predicts for its modality
    for name in predictions:
        np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(work / "out_LGE" / name))),
                                      sitk.GetArrayFromImage(sitk.ReadImage(str(work / "out_LGE_stock" / name))))

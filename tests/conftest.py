import json
import os
import subprocess
import sys

import pytest

# One torch thread in the tests' own processes and what they start (nnU-Net's commands on CPU set their
# trainer's or predictor's threads themselves): the tests' networks are tiny, and two threads fighting
# nnU-Net's worker processes for 2 cores made a five-fold prediction 3x slower here (5.3 s, 1.7 s)
os.environ.setdefault("OMP_NUM_THREADS", "1")

REAL_DATA_ENV = "NNUNETV2_CSA_REAL_DATA"
REQUIRE_REAL_DATA_ENV = "NNUNETV2_CSA_REQUIRE_REAL_DATA"


@pytest.fixture(scope="session")
def real_data_root():
    """The folder holding ``myops2020/``; a skip (or, in CI, a failure) when it is not there."""
    root = os.environ.get(REAL_DATA_ENV)
    reason = None
    if not root:
        reason = f"{REAL_DATA_ENV} is not set (it points at the folder that holds myops2020/)"
    elif not os.path.isdir(os.path.join(root, "myops2020", "train")):
        reason = f"{REAL_DATA_ENV}={root} has no myops2020/train folder"
    if reason:
        if os.environ.get(REQUIRE_REAL_DATA_ENV) == "1":
            pytest.fail(f"real data required ({REQUIRE_REAL_DATA_ENV}=1): {reason}")
        pytest.skip(reason)
    return root


# ---------------------------------------------------------------- a fresh interpreter
_TRAINER_IMPORT_PROBE = """
import os, sys
import nnunetv2_csa.training.trainers, nnunetv2_csa.ext_trainers.nnunetv2_csa_trainers
print("\\n".join(m for m in sys.modules if m.startswith(("nnunetv2_csa", "dataset_conversion"))), flush=True)

from nnunetv2_csa.modality import ModalityTagError

def uncaught(error, traceback_wanted):
    # what the interpreter does with an uncaught exception: hand it to sys.excepthook
    os.environ["NNUNETV2_CSA_TRACEBACK"] = traceback_wanted
    try:
        raise error
    except BaseException:
        sys.excepthook(*sys.exc_info())
    sys.stderr.write("=====\\n")

uncaught(ModalityTagError("x"), "1")
uncaught(RuntimeError("a bug"), "0")
os.environ["NNUNETV2_CSA_TRACEBACK"] = "0"
raise ModalityTagError("nnUNet_csa_modality is not set; this model knows [LGE, C0]")
"""


@pytest.fixture(scope="session")
def trainer_import_probe() -> subprocess.CompletedProcess:
    """A fresh interpreter that imports every trainer (as ``nnUNetv2_train -tr`` does), prints the
    package modules that loaded (stdout), then hands this package's input error and another
    error to the interpreter's hook and ends on an uncaught input error (stderr, split by
    ``=====``). One process for tests/test_layout.py and tests/test_cli.py: the import costs seconds."""
    return subprocess.run([sys.executable, "-c", _TRAINER_IMPORT_PROBE], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "NNUNETV2_CSA_TRACEBACK": "0"})


# ---------------------------------------------------------------- tiny nnU-Net datasets
TINY_DATASET_ID = 993


def nnunet_environment(root) -> dict:
    """Environment for nnU-Net commands on CPU with 2 cores, folders under ``root``."""
    env = dict(os.environ)
    env.update({
        "nnUNet_raw": str(root / "nnUNet_raw"),
        "nnUNet_preprocessed": str(root / "nnUNet_preprocessed"),
        "nnUNet_results": str(root / "nnUNet_results"),
        "nnUNet_extTrainer": _trainer_dir(),
        # nnU-Net's defaults assume many cores; these are the fast settings on 2 (measured on these machines). One
        # worker per final-validation pool: a tiny training took 20.3 s instead of 25.4 s with two (each
        # spawned worker imports torch and nnU-Net, ~6 s of one core, while the trainer predicts)
        "nnUNet_def_n_proc": "1",
        "nnUNet_compile": "false",
        "PYTHONWARNINGS": "ignore",
    })
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.makedirs(env[key], exist_ok=True)
    return env


def _trainer_dir() -> str:
    from nnunetv2_csa.ext_trainers import TRAINER_DIR
    return TRAINER_DIR


TEST_TRAINER_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ext_trainers")


def with_test_trainers(env: dict) -> dict:
    """``env`` in which nnU-Net's commands also find the test suite's trainers (tests/ext_trainers)."""
    return dict(env, nnUNet_extTrainer=os.pathsep.join([_trainer_dir(), TEST_TRAINER_DIR]))


def run_command(args, env, timeout=900, check=True) -> subprocess.CompletedProcess:
    """Run a console script of this venv (as the tools do); on failure the assertion shows its output."""
    from nnunetv2_csa.tools.commands import command_environment, console_command

    result = subprocess.run(console_command(args[0]) + [str(a) for a in args[1:]],
                            env=command_environment(args[0], env), capture_output=True,
                            text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {result.returncode}\n--- stdout\n{result.stdout[-6000:]}"
                             f"\n--- stderr\n{result.stderr[-6000:]}")
    return result


def read_labels(folder) -> dict:
    """Each segmentation of ``folder`` (file name -> array)."""
    import SimpleITK as sitk
    return {f: sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(folder, f)))
            for f in sorted(os.listdir(folder)) if f.endswith(".nii.gz")}


def predict_in_process(env, model_folder, input_folder, output_folder, modality=None, folds=0,
                       probabilities=False) -> dict:
    """nnU-Net's predictor in the test's process (nnUNetv2_predict's code and defaults,
    tools/prediction.py), told ``modality``; returns the segmentations, or with
    ``probabilities`` the class probabilities (case -> array; a comparison that must tell two
    predictions apart even where an undertrained model segments only background). The commands
    themselves run in tests/test_trainer_integration.py and the README's workflow test."""
    from nnunetv2_csa.tools.prediction import predict_folder

    overrides = {"nnUNet_extTrainer": env.get("nnUNet_extTrainer"), "nnUNet_csa_modality": modality}
    with open(f"{output_folder}.log", "w") as log:
        error = predict_folder(str(model_folder), folds, str(input_folder), str(output_folder), "cpu", overrides, log,
                               save_probabilities=probabilities)
    assert error is None, f"{error}\n{open(f'{output_folder}.log').read()[-3000:]}"
    return read_probabilities(output_folder) if probabilities else read_labels(output_folder)


def read_probabilities(folder) -> dict:
    """The class probabilities nnU-Net saved (``--save_probabilities``), file name -> float64 array."""
    import numpy as np

    return {f: np.load(os.path.join(folder, f))["probabilities"].astype(np.float64) for f in sorted(os.listdir(folder))
            if f.endswith(".npz")}


@pytest.fixture(scope="session")
def tiny_preprocessed_dataset(tmp_path_factory):
    """The one nnU-Net dataset of the session's 2D tests (the benchmark's, the trainers',
    ResEnc's): phantom MS-CMRSeg, 10 patients of 48 x 48 in-plane, each contributing one
    modality (--unpaired), 5 folds stratified by modality, so that each fold holds out one
    patient per modality, whose other modality the benchmark must predict and score too.
    Converted and planned with the commands a user runs. Returns (environment, dataset folder name)."""
    from nnunetv2_csa.tools.phantom import write_mscmrseg_phantom

    root = tmp_path_factory.mktemp("nnunet")
    env = nnunet_environment(root)
    source = root / "phantom"
    write_mscmrseg_phantom(str(source), n_patients=10, modalities=("LGE", "C0"), seed=5, in_plane_size=48)
    run_command(["nnUNetv2_csa_convert_mscmrseg", "-i", str(source), "-d", str(TINY_DATASET_ID),
                 "--modalities", "LGE", "C0", "--unpaired"], env)
    # nnU-Net's integrity check of the converters' output: tests/test_conversion.py, the README's workflow
    run_command(["nnUNetv2_plan_and_preprocess", "-d", str(TINY_DATASET_ID), "-c", "2d", "-np", "2", "-npfp", "2"],
                env)
    name = next(d for d in os.listdir(env["nnUNet_preprocessed"]) if d.startswith(f"Dataset{TINY_DATASET_ID}_"))
    return env, name


def plans_variant(env: dict, dataset_name: str, name: str, batch_size: int | None = None,
                  features_per_stage: list | None = None, source: str = "nnUNetPlans",
                  configuration_name: str = "2d", width_divisor: int | None = None) -> str:
    """A copy of a dataset's plans ``source`` under the plans name ``name``, with another batch size
    or network width of one configuration (the preprocessed data are shared: same data identifier):
    ``features_per_stage``, or each stage's features divided by ``width_divisor`` (at least 4; the
    architecture, its stages and blocks stay nnU-Net's). Returns ``name``."""
    folder = os.path.join(env["nnUNet_preprocessed"], dataset_name)
    with open(os.path.join(folder, f"{source}.json")) as f:
        plans = json.load(f)
    plans["plans_name"] = name
    configuration = plans["configurations"][configuration_name]
    architecture = configuration["architecture"]["arch_kwargs"]
    if batch_size is not None:
        configuration["batch_size"] = batch_size
    if width_divisor is not None:
        features_per_stage = [max(4, f // width_divisor) for f in architecture["features_per_stage"]]
    if features_per_stage is not None:
        architecture["features_per_stage"] = features_per_stage
    with open(os.path.join(folder, f"{name}.json"), "w") as f:
        json.dump(plans, f)
    return name


VOLUME_DATASET_ID = 995


@pytest.fixture(scope="session")
def coronal_volume_dataset(tmp_path_factory):
    """The session's 3D dataset: the MM-WHS phantom (CT + MR volumes, 32^3), converted with
    ``--coronal`` (its spacing makes the converter print the coronal 2d planning command) and
    planned for 3d_fullres by nnU-Net's defaults, as the converter advises for 3D. For the
    coronal planning test (tests/test_conversion.py) and the 3d_fullres test
    (tests/test_resenc_and_3d.py). Returns (environment, dataset folder name, the converter's stderr)."""
    from nnunetv2_csa.tools.phantom import write_mmwhs_phantom

    root = tmp_path_factory.mktemp("nnunet_3d")
    env = nnunet_environment(root)
    write_mmwhs_phantom(str(root / "phantom"), n_per_modality=3, size=32, seed=2)
    converted = run_command(["nnUNetv2_csa_convert_mmwhs", "-i", str(root / "phantom"), "-d", str(VOLUME_DATASET_ID),
                             "--split", "80-20", "--coronal"], env)
    run_command(["nnUNetv2_plan_and_preprocess", "-d", str(VOLUME_DATASET_ID), "-c", "3d_fullres", "-np", "2",
                 "-npfp", "2"], env)
    name = next(d for d in os.listdir(env["nnUNet_preprocessed"]) if d.startswith(f"Dataset{VOLUME_DATASET_ID}_"))
    return env, name, converted.stderr


# ---------------------------------------------------------------- a trainer in the test's process
TINY_DATASET_JSON = {"labels": {"background": 0, "a": 1, "b": 2, "c": 3}, "channel_names": {"0": "zscore"},
                     "file_ending": ".nii.gz", "numTraining": 4}


@pytest.fixture
def initialized_trainer(tmp_path, monkeypatch):
    """``make(trainer)``: the trainer class ``trainer`` (or this package's trainer of that name) on the tiny plan of
    tests/test_trainer_units.py (4 stages, 32 x 32, batch 4, modalities LGE and C0), initialized on CPU as
    ``nnUNetv2_train`` initializes it (network, optimizer, loss; compile off), without any data: its
    ``train_step`` and ``validation_step`` take batches built by the test; ``device`` is the trainer's
    (``"meta"``: tests/second_device.py), ``dataset_changes`` entries of its dataset.json. About 1 s."""
    import torch
    import nnunetv2_csa.training.trainers as trainers
    from test_trainer_units import _plans

    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (tmp_path / key).mkdir()
        monkeypatch.setenv(key, str(tmp_path / key))
    monkeypatch.setenv("nnUNet_compile", "false")
    plans = _plans().plans
    # nnU-Net's initialize infers the dataset class from the preprocessed folder's file endings
    preprocessed = tmp_path / "nnUNet_preprocessed" / plans["dataset_name"] / \
        plans["configurations"]["2d"]["data_identifier"]
    preprocessed.mkdir(parents=True)
    (preprocessed / "p1_LGE.b2nd").touch()
    dataset_json = {**TINY_DATASET_JSON, "csa_modalities": ["LGE", "C0"],
                    "csa_case_modality": {"p1_LGE": "LGE", "p2_C0": "C0", "p3_LGE": "LGE", "p4_C0": "C0"}}

    def make(trainer, device="cpu", dataset_changes=None, **plans_changes):
        trainer_plans = {**plans, **plans_changes, "continue_training": False}
        trainer_class = getattr(trainers, trainer) if isinstance(trainer, str) else trainer
        trainer = trainer_class(trainer_plans, "2d", 0, {**dataset_json, **(dataset_changes or {})},
                                torch.device(device))
        trainer.initialize()
        return trainer
    return make

"""Checkpoints are read without running code from them; what nnU-Net writes still loads."""
import json
import os

import numpy as np
import pytest
import torch

from nnunetv2_csa.checkpoints import CheckpointError, load_checkpoint
from nnunetv2_csa.tools.export import main as export_main


class _RunsCodeWhenUnpickled:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _nnunet_like_checkpoint():
    # the types nnU-Net's save_checkpoint writes: tensors, plain containers, NumPy scalars, torch.device
    return {"network_weights": {"w": torch.ones(2)}, "optimizer_state": {"state": {}, "param_groups": [{"lr": 0.01}]},
            "grad_scaler_state": None,
            "logging": {"train_losses": [np.float64(-0.5)], "mean_fg_dice": [np.float32(0.7)],
                        "mean_fg_dice_per_modality": [[0.6, 0.8]]},
            "_best_ema": np.float64(0.7), "current_epoch": 3,
            "init_args": {"plans": {"a": 1}, "configuration": "2d", "fold": 0, "dataset_json": {},
                          "device": torch.device("cpu")},
            "trainer_name": "nnUNetTrainerCSA", "inference_allowed_mirroring_axes": (0, 1)}


def test_an_nnunet_checkpoint_loads_without_full_pickle(tmp_path):
    path = tmp_path / "checkpoint_final.pth"
    torch.save(_nnunet_like_checkpoint(), path)
    checkpoint = load_checkpoint(str(path))
    assert checkpoint["logging"]["mean_fg_dice"][0] == np.float32(0.7)
    assert checkpoint["init_args"]["device"] == torch.device("cpu")


def test_a_checkpoint_that_would_run_code_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "was_run"
    path = tmp_path / "checkpoint_final.pth"
    torch.save(dict(_nnunet_like_checkpoint(), extra=_RunsCodeWhenUnpickled(marker)), path)
    with pytest.raises(CheckpointError, match=r"checkpoint_final\.pth holds objects.*--trust-checkpoint"):
        load_checkpoint(str(path))
    assert not marker.exists()


def test_a_truncated_checkpoint_is_named(tmp_path):
    path = tmp_path / "checkpoint_latest.pth"
    torch.save(_nnunet_like_checkpoint(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"checkpoint_latest\.pth is not a readable checkpoint"):
        load_checkpoint(str(path))


def test_export_refuses_a_crafted_checkpoint_in_one_line(tmp_path, capsys):
    marker = tmp_path / "was_run"
    model = tmp_path / "model"
    (model / "fold_0").mkdir(parents=True)
    (model / "plans.json").write_text(json.dumps({"csa_modalities": ["LGE", "C0"], "configurations": {}}))
    (model / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "myo": 1}}))
    torch.save({"trainer_name": "nnUNetTrainerCSA", "payload": _RunsCodeWhenUnpickled(marker)},
               model / "fold_0" / "checkpoint_final.pth")
    with pytest.raises(SystemExit) as exit_info:
        export_main(["-m", str(model), "--modality", "LGE", "-o", str(tmp_path / "exported")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "--trust-checkpoint" in err and len(err.splitlines()) == 1
    assert not marker.exists() and not (tmp_path / "exported").exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".export_")]


def test_resume_names_a_truncated_checkpoint_before_nnunet_reads_it(tmp_path):
    from nnunetv2_csa.training.resume import ReadableCheckpointMixin

    class _Trainer:
        def load_checkpoint(self, filename_or_checkpoint):
            self.loaded = filename_or_checkpoint

    class _Checked(ReadableCheckpointMixin, _Trainer):
        pass

    good = tmp_path / "checkpoint_final.pth"
    torch.save(_nnunet_like_checkpoint(), good)
    trainer = _Checked()
    trainer.load_checkpoint(str(good))
    assert trainer.loaded == str(good)
    bad = tmp_path / "checkpoint_latest.pth"
    bad.write_bytes(good.read_bytes()[:-200])
    with pytest.raises(CheckpointError, match=r"checkpoint_latest\.pth is not a readable checkpoint.*delete it"):
        _Checked().load_checkpoint(str(bad))
    in_memory = {"already": "loaded"}
    trainer.load_checkpoint(in_memory)  # a dict is nnU-Net's business
    assert trainer.loaded is in_memory


def test_nnunet_load_checkpoint_hook_still_takes_a_path_or_a_dict():
    # the mixin overrides this hook; a change of nnU-Net's signature must show up here
    import inspect
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    assert list(inspect.signature(nnUNetTrainer.load_checkpoint).parameters) == ["self", "filename_or_checkpoint"]

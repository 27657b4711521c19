"""The export's answers to bad input, on a tiny model folder written here (no training)."""
import json
import os

import pytest
import torch

from nnunetv2_csa.tools.export import ExportError, export_modality
from nnunetv2_csa.modality import ModalityTagError
from nnunetv2_csa.modality_norm import set_modality
from nnunetv2_csa.training.nnUNetTrainerCSA import nnUNetTrainerCSA
from ext_trainers.nnunetv2_csa_test_trainers import mark_modalities_apart
from test_trainer_units import _plans

DATASET_JSON = {"labels": {"background": 0, "a": 1, "b": 2, "c": 3}, "channel_names": {"0": "zscore"},
                "file_ending": ".nii.gz", "numTraining": 2}


def _network_with_marked_norms():
    """A CSA network (the same one each call) whose norms of modality k have the weight 1 + k/2 and the
    bias k/2 in every layer."""
    torch.manual_seed(0)
    network = nnUNetTrainerCSA.build_modality_network(_plans(), _plans().get_configuration("2d"), 1, 4, True)
    return mark_modalities_apart(network)


def _model_folder(root, folds=("0",), finished=("0",), checkpoint=None):
    plans = _plans().plans
    model = root / "nnUNetTrainerCSA__nnUNetPlans__2d"
    model.mkdir()
    (model / "plans.json").write_text(json.dumps(plans))
    (model / "dataset.json").write_text(json.dumps(DATASET_JSON))
    network = _network_with_marked_norms()
    for fold in folds:
        (model / f"fold_{fold}").mkdir()
        if fold in finished:
            torch.save(checkpoint if checkpoint is not None else
                       {"network_weights": network.state_dict(), "trainer_name": "nnUNetTrainerCSA",
                        "init_args": {"configuration": "2d"}, "current_epoch": 1},
                       model / f"fold_{fold}" / "checkpoint_final.pth")
    return str(model)


def test_export_finds_its_own_trainers_without_nnunet_exttrainer(tmp_path, monkeypatch):
    monkeypatch.delenv("nnUNet_extTrainer", raising=False)
    out = export_modality(_model_folder(tmp_path), "C0", str(tmp_path / "exported"))
    checkpoint = torch.load(os.path.join(out, "fold_0", "checkpoint_final.pth"), weights_only=False)
    assert checkpoint["trainer_name"] == "nnUNetTrainer"
    assert not any(".norms." in k or "csa_modality_order" in k for k in checkpoint["network_weights"])


@pytest.mark.parametrize("modality, index", [("LGE", 0), ("C0", 1)])
def test_the_export_of_a_modality_carries_that_modalitys_norms(tmp_path, modality, index):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    out = export_modality(_model_folder(tmp_path), modality, str(tmp_path / "exported"))
    weights = torch.load(os.path.join(out, "fold_0", "checkpoint_final.pth"), weights_only=False)["network_weights"]
    norm_weights = {k: v for k, v in weights.items() if k.endswith(".norm.weight")}
    norm_biases = {k: v for k, v in weights.items() if k.endswith(".norm.bias")}
    assert norm_weights and len(norm_weights) == len(norm_biases)
    assert all(torch.all(v == 1 + index / 2) for v in norm_weights.values())
    assert all(torch.all(v == index / 2) for v in norm_biases.values())
    # and nnU-Net's own network with these weights computes what the CSA network computes for that modality
    stock = nnUNetTrainer.build_network_architecture(_plans(), _plans().get_configuration("2d"), 1, 4, True)
    stock.load_state_dict(weights)
    csa = _network_with_marked_norms()
    set_modality(csa, index)
    image = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(stock.eval()(image)[0], csa.eval()(image)[0])


def test_output_in_a_missing_parent_is_named(tmp_path):
    with pytest.raises(ExportError, match=r"missing/parent that -o .* does not exist; create it"):
        export_modality(_model_folder(tmp_path), "C0", str(tmp_path / "missing" / "parent" / "out"))


def test_an_unfinished_extra_fold_points_at_the_finished_ones(tmp_path):
    with pytest.raises(ExportError, match=r"fold_1/checkpoint_final\.pth does not exist.*\(-f 0\)"):
        export_modality(_model_folder(tmp_path, folds=("0", "1")), "C0", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".export_")]


def test_a_checkpoint_without_init_args_is_named(tmp_path):
    folder = _model_folder(tmp_path, checkpoint={"network_weights": {}, "trainer_name": "nnUNetTrainerCSA"})
    with pytest.raises(ExportError, match=r"checkpoint_final\.pth lacks \['init_args'\]"):
        export_modality(folder, "C0", str(tmp_path / "out"))


def test_a_model_folder_without_modality_names_is_named(tmp_path):
    folder = _model_folder(tmp_path)
    plans = json.loads((tmp_path / "nnUNetTrainerCSA__nnUNetPlans__2d" / "plans.json").read_text())
    del plans["csa_modalities"]
    (tmp_path / "nnUNetTrainerCSA__nnUNetPlans__2d" / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(ModalityTagError, match=r"plans\.json has no 'csa_modalities' entry: this package's trainers "
                                               r"write it .* nnunetv2_csa trainer that has modality-specific norms"):
        export_modality(folder, "C0", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_a_terminated_export_leaves_nothing_behind(tmp_path, monkeypatch):
    # SIGTERM after the first fold is saved: the command unwinds as after Ctrl-C and removes its .export_* folder
    import signal

    from nnunetv2_csa.tools.export import main

    model = _model_folder(tmp_path, folds=("0", "1"), finished=("0", "1"))
    save = torch.save
    saved = []

    def save_then_terminate(obj, path, *args, **kwargs):
        save(obj, path, *args, **kwargs)
        saved.append(path)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(torch, "save", save_then_terminate)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(SystemExit) as exit_info:
        main(["-m", model, "--modality", "LGE", "-o", str(tmp_path / "exported")])
    assert exit_info.value.code == 128 + signal.SIGTERM and len(saved) == 1
    assert sorted(os.listdir(tmp_path)) == before  # no exported folder, no .export_* staging folder
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is the command's only

"""nnUNetv2_csa_heldout copies every channel of a held-out case (nnUNetv2_predict needs them all), or
refuses with one line before writing anything when a channel's file is missing."""
import json
import os

import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_csa.errors import UserInputError
from nnunetv2_csa.tools.heldout import HeldOutError, write_held_out

CASES = {"p1_LGE": "LGE", "p2_C0": "C0", "p3_LGE": "LGE"}


def raw_dataset(tmp_path, monkeypatch, channels: int):
    """Dataset904 in nnU-Net's raw layout with ``channels`` image files per case (tiny images, each
    filled with its own value: the command checks their headers and copies them); fold 0 holds out
    p1_LGE and p2_C0."""
    raw = tmp_path / "raw" / "Dataset904_Channels"
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir()
    (tmp_path / "preprocessed").mkdir()
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "preprocessed"))
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "preprocessed"))
    (raw / "dataset.json").write_text(json.dumps({
        "channel_names": {str(k): f"channel{k}" for k in range(channels)}, "labels": {"background": 0, "myo": 1},
        "numTraining": len(CASES), "file_ending": ".nii.gz", "csa_modalities": ["LGE", "C0"],
        "csa_case_modality": CASES}))
    (raw / "splits_final.json").write_text(json.dumps([{"train": ["p3_LGE"], "val": ["p1_LGE", "p2_C0"]}]))
    for number, case in enumerate(CASES):
        for k in range(channels):
            _write_image(raw / "imagesTr" / f"{case}_{k:04d}.nii.gz", 10 * number + k)
        _write_image(raw / "labelsTr" / f"{case}.nii.gz", 1)
    return raw


def _write_image(path, value):
    sitk.WriteImage(sitk.GetImageFromArray(np.full((2, 4, 4), value, np.float32)), str(path))


@pytest.mark.parametrize("channels", [1, 2, 3])
def test_every_channel_of_a_held_out_case_is_copied(tmp_path, monkeypatch, channels):
    raw = raw_dataset(tmp_path, monkeypatch, channels)
    out = tmp_path / "heldout"
    assert write_held_out("904", 0, str(out)) == {"LGE": ["p1_LGE"], "C0": ["p2_C0"]}
    for case, modality in (("p1_LGE", "LGE"), ("p2_C0", "C0")):
        images = sorted(os.listdir(out / modality / "images"))
        assert images == [f"{case}_{k:04d}.nii.gz" for k in range(channels)]  # no more, no fewer
        for name in images:
            assert (out / modality / "images" / name).read_bytes() == (raw / "imagesTr" / name).read_bytes()
        assert os.listdir(out / modality / "labels") == [f"{case}.nii.gz"]


def test_a_missing_channel_is_one_error_before_anything_is_written(tmp_path, monkeypatch):
    raw = raw_dataset(tmp_path, monkeypatch, 2)
    os.remove(raw / "imagesTr" / "p2_C0_0001.nii.gz")
    with pytest.raises(HeldOutError, match=r"1 file\(s\) of the held-out cases are missing \(.*p2_C0_0001\.nii\.gz\);"
                                           r" the dataset has 2 channel\(s\)"):
        write_held_out("904", 0, str(tmp_path / "heldout"))
    assert sorted(os.listdir(tmp_path)) == ["preprocessed", "raw"]  # no output, no staging folder


def test_an_unreadable_image_is_one_error_before_anything_is_written(tmp_path, monkeypatch):
    raw = raw_dataset(tmp_path, monkeypatch, 1)
    (raw / "imagesTr" / "p2_C0_0000.nii.gz").write_bytes(b"")
    with pytest.raises(UserInputError, match=r"p2_C0_0000\.nii\.gz is empty \(0 bytes\)"):
        write_held_out("904", 0, str(tmp_path / "heldout"))
    assert sorted(os.listdir(tmp_path)) == ["preprocessed", "raw"]


def test_a_terminated_copy_leaves_nothing_behind(tmp_path, monkeypatch):
    import shutil
    import signal

    from nnunetv2_csa.tools import heldout

    raw_dataset(tmp_path, monkeypatch, 2)
    copy = shutil.copyfile

    def copy_then_terminate(source, target):
        copy(source, target)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(heldout.shutil, "copyfile", copy_then_terminate)
    with pytest.raises(SystemExit) as exit_info:
        heldout.main(["-d", "904", "-o", str(tmp_path / "heldout")])
    assert exit_info.value.code == 128 + signal.SIGTERM
    assert sorted(os.listdir(tmp_path)) == ["preprocessed", "raw"]  # no output, no .heldout_* staging folder

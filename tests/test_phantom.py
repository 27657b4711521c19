"""Tests of the synthetic datasets: layouts, codes, geometry, seeding, appearance, topology, CLI."""
from __future__ import annotations

import os
import re

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import given, settings, strategies as st
from scipy import ndimage

from dataset_conversion.phantom_marker import PHANTOM_MARKER, read_phantom_marker
from nnunetv2_csa.tools import phantom

SMALL = 48  # smallest allowed in-plane matrix: keeps the tests fast


def _read(path: str) -> tuple[sitk.Image, np.ndarray]:
    image = sitk.ReadImage(path)
    return image, sitk.GetArrayFromImage(image)


def _geometry(image: sitk.Image):
    return image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection()


def _lv_neighbours_outside(label: np.ndarray, lv_code: int, allowed: tuple[int, ...]) -> int:
    """Number of (LV pixel, in-slice 4-neighbour) pairs whose neighbour is not in `allowed`."""
    padded = np.pad(label, ((0, 0), (1, 1), (1, 1)), constant_values=-1)
    lv = padded == lv_code
    bad = 0
    for axis in (1, 2):
        for shift in (1, -1):
            neighbour = np.roll(padded, shift, axis=axis)
            bad += int(np.sum(lv & ~np.isin(neighbour, allowed)))
    return bad


def _touches_border(label: np.ndarray) -> bool:
    return bool(label[:, [0, -1], :].any() or label[:, :, [0, -1]].any())


# ------------------------------------------------------------------------------ MS-CMRSeg
@pytest.fixture(scope="module")
def mscmrseg_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("mscmrseg")
    paths = phantom.write_mscmrseg_phantom(str(out), n_patients=3, seed=5, in_plane_size=SMALL,
                                           unlabelled={"LGE": [2], "T2": [1, 3]})
    return out, paths


def test_mscmrseg_file_names_follow_the_release(mscmrseg_dir):
    out, paths = mscmrseg_dir
    expected = {f"patient{n}_{s}.nii.gz" for n in (1, 2, 3) for s in ("C0", "LGE", "T2")}
    expected |= {f"patient{n}_{s}_manual.nii.gz" for n, s in
                 [(1, "C0"), (2, "C0"), (3, "C0"), (1, "LGE"), (3, "LGE"), (2, "T2")]}
    assert set(os.listdir(out)) == expected | {PHANTOM_MARKER}
    assert sorted(os.path.basename(p) for p in paths) == sorted(expected)
    assert all(os.path.dirname(p) == str(out) for p in paths)


def test_mscmrseg_labels_codes_geometry_and_dtypes(mscmrseg_dir):
    out, _ = mscmrseg_dir
    for name in sorted(n for n in os.listdir(out) if n.endswith(".nii.gz")):
        if not name.endswith("_manual.nii.gz"):
            continue
        label_image, label = _read(os.path.join(out, name))
        image, _ = _read(os.path.join(out, name.replace("_manual", "")))
        assert set(np.unique(label).tolist()) == {0, 200, 500, 600}, name
        assert _geometry(label_image) == _geometry(image), name
        assert label_image.GetPixelID() == sitk.sitkInt16 and image.GetPixelID() == sitk.sitkInt16


def test_mscmrseg_phantom_writes_the_sequence_spacings_its_docstring_states(mscmrseg_dir):
    # the published MS-CMRSeg spacings (the release itself is not here to compare with, unlike MyoPS below)
    out, _ = mscmrseg_dir
    nominal = {"C0": (1.25, 10.0), "LGE": (0.75, 5.0), "T2": (1.35, 12.0)}
    for sequence, (in_plane, through_plane) in nominal.items():
        image, array = _read(os.path.join(out, f"patient1_{sequence}.nii.gz"))
        sx, sy, sz = image.GetSpacing()
        assert sx == pytest.approx(in_plane, rel=0.05) and sy == pytest.approx(sx)
        assert sz == pytest.approx(through_plane)
        assert image.GetSize()[:2] == (SMALL, SMALL)
        assert array.min() >= 0  # MR magnitude
    # The sequences of one patient are separate acquisitions: not one grid.
    sizes = {_read(os.path.join(out, f"patient1_{s}.nii.gz"))[0].GetSpacing() for s in nominal}
    assert len(sizes) == 3


def test_unlabelled_validates_its_input(tmp_path):
    with pytest.raises(ValueError, match="T2"):
        phantom.write_mscmrseg_phantom(str(tmp_path), 2, modalities=("C0", "LGE"), unlabelled={"T2": [1]},
                                       in_plane_size=SMALL)
    with pytest.raises(ValueError, match=r"\[3\]"):
        phantom.write_mscmrseg_phantom(str(tmp_path), 2, unlabelled={"LGE": [3]}, in_plane_size=SMALL)
    assert os.listdir(tmp_path) == []  # nothing written for bad input


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="in_plane_size"):
        phantom.write_mscmrseg_phantom(str(tmp_path), 1, in_plane_size=20)
    with pytest.raises(ValueError, match="seed"):
        phantom.write_myops_phantom(str(tmp_path), 1, seed=-1, in_plane_size=SMALL)
    with pytest.raises(ValueError, match="n_per_modality"):
        phantom.write_mmwhs_phantom(str(tmp_path), 0)
    with pytest.raises(ValueError, match="sequences"):
        phantom.mscmrseg_patient_volumes(1, modalities=("bSSFP",), in_plane_size=SMALL)


def test_same_seed_same_files_other_seed_other_files(tmp_path):
    kwargs = dict(n_patients=2, modalities=("C0", "LGE"), in_plane_size=SMALL)
    first = phantom.write_mscmrseg_phantom(str(tmp_path / "a"), seed=3, **kwargs)
    again = phantom.write_mscmrseg_phantom(str(tmp_path / "b"), seed=3, **kwargs)
    other = phantom.write_mscmrseg_phantom(str(tmp_path / "c"), seed=4, **kwargs)
    for path_a, path_b, path_c in zip(first, again, other):
        image_a, array_a = _read(path_a)
        image_b, array_b = _read(path_b)
        assert np.array_equal(array_a, array_b) and _geometry(image_a) == _geometry(image_b)
        _, array_c = _read(path_c)
        assert array_a.shape != array_c.shape or not np.array_equal(array_a, array_c)


def test_a_patient_does_not_depend_on_the_rest_of_the_dataset():
    alone = phantom.mscmrseg_patient_volumes(2, modalities=("LGE",), seed=1, in_plane_size=SMALL)["LGE"]
    among = phantom.mscmrseg_patient_volumes(2, modalities=("C0", "LGE", "T2"), seed=1,
                                             in_plane_size=SMALL)["LGE"]
    assert np.array_equal(alone.image, among.image) and np.array_equal(alone.label, among.label)


def test_modalities_have_different_contrast():
    """Median myocardium / LV blood: bSSFP grey on bright, LGE black on grey, T2 bright on dark."""
    ratios = {"C0": [], "LGE": [], "T2": []}
    for patient in range(1, 5):
        for sequence, volume in phantom.mscmrseg_patient_volumes(patient, seed=0, in_plane_size=SMALL).items():
            myocardium = np.median(volume.image[volume.label == 200])
            blood = np.median(volume.image[volume.label == 500])
            ratios[sequence].append(myocardium / blood)
    assert max(ratios["C0"]) < 1 and max(ratios["LGE"]) < 1 and min(ratios["T2"]) > 1.5
    assert min(ratios["C0"]) > 1.3 * max(ratios["LGE"])


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2 ** 31), patient=st.integers(1, 45), size=st.sampled_from([48, 64, 96]))
def test_myocardium_surrounds_the_lv_in_every_slice(seed, patient, size):
    for sequence, volume in phantom.mscmrseg_patient_volumes(patient, seed=seed, in_plane_size=size).items():
        label = volume.label
        assert set(np.unique(label).tolist()) == {0, 200, 500, 600}, sequence
        assert (label == 500).any(axis=(1, 2)).all(), "every slice cuts the LV"
        assert _lv_neighbours_outside(label, 500, (500, 200)) == 0, sequence
        assert not _touches_border(label), "the heart fits the field of view"


def test_ring_check_catches_an_lv_touching_the_rv():
    """The topology helper itself fails on a broken ring (so the property test can fail)."""
    label = np.zeros((1, 7, 7), dtype=np.int16)
    label[0, 1:6, 1:6] = 200
    label[0, 2:5, 2:5] = 500
    assert _lv_neighbours_outside(label, 500, (500, 200)) == 0
    label[0, 3, 5] = 600
    assert _lv_neighbours_outside(label, 500, (500, 200)) == 1


# ---------------------------------------------------------------------------------- MyoPS
@pytest.fixture(scope="module")
def myops_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("myops")
    return out, phantom.write_myops_phantom(str(out), n_patients=3, seed=2, first_id=3001, in_plane_size=SMALL)


def test_myops_layout_codes_and_shared_grid(myops_dir):
    out, paths = myops_dir
    assert set(os.listdir(out)) == {"Case3001", "Case3002", "Case3003", PHANTOM_MARKER}
    for case in ("Case3001", "Case3002", "Case3003"):
        names = {f"{case}_{s}.nii.gz" for s in ("C0", "LGE", "T2", "gd")}
        assert set(os.listdir(out / case)) == names
        label_image, label = _read(str(out / case / f"{case}_gd.nii.gz"))
        assert set(np.unique(label).tolist()) == {0, 200, 500, 600, 1220, 2221}
        assert label_image.GetPixelID() == sitk.sitkInt16
        for sequence in ("C0", "LGE", "T2"):
            image, array = _read(str(out / case / f"{case}_{sequence}.nii.gz"))
            assert image.GetPixelID() == sitk.sitkInt16 and array.min() >= 0
            assert _geometry(image) == _geometry(label_image)
        direction = np.array(label_image.GetDirection()).reshape(3, 3)
        assert np.allclose(direction @ direction.T, np.eye(3), atol=1e-5)
        assert not np.allclose(direction, np.eye(3), atol=1e-3), "short-axis stacks are oblique"
    assert len(paths) == 12 and all(re.fullmatch(r"Case300\d_(C0|LGE|T2|gd)\.nii\.gz", os.path.basename(p))
                                    for p in paths)


def _pathology_inside_the_ring(label: np.ndarray) -> bool:
    """Edema and scar lie in the one myocardial ring that encloses the LV, slice by slice."""
    for slice_label in label:
        pathology = np.isin(slice_label, (1220, 2221))
        if not pathology.any():
            continue
        ring_components, count = ndimage.label(np.isin(slice_label, (200, 1220, 2221)),
                                               structure=np.ones((3, 3)))
        ring_of_the_lv = np.unique(ring_components[ndimage.binary_dilation(slice_label == 500)])
        ring_of_the_lv = ring_of_the_lv[ring_of_the_lv > 0]
        if len(ring_of_the_lv) != 1 or not np.all(ring_components[pathology] == ring_of_the_lv[0]):
            return False
    return True


def test_pathology_check_catches_a_blob_outside_the_myocardium():
    label = np.zeros((1, 9, 9), dtype=np.int16)
    label[0, 1:6, 1:6] = 200
    label[0, 2:5, 2:5] = 500
    label[0, 1, 2] = 2221
    assert _pathology_inside_the_ring(label)
    label[0, 7, 7] = 1220
    assert not _pathology_inside_the_ring(label)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2 ** 31), case_id=st.integers(3001, 3050))
def test_myops_pathology_inside_the_myocardium_and_ring_closed(seed, case_id):
    volumes, label = phantom.myops_patient_volumes(case_id, seed=seed, in_plane_size=SMALL)
    assert set(np.unique(label).tolist()) == {0, 200, 500, 600, 1220, 2221}
    assert _lv_neighbours_outside(label, 500, (500, 200, 1220, 2221)) == 0
    assert _pathology_inside_the_ring(label)
    assert not _touches_border(label)
    assert all(np.array_equal(v.label, label) for v in volumes.values())


def test_myops_scar_bright_in_lge_edema_bright_in_t2():
    volumes, label = phantom.myops_patient_volumes(3001, seed=0, in_plane_size=SMALL)
    lge, t2 = volumes["LGE"].image, volumes["T2"].image
    assert np.median(lge[label == 2221]) > 3 * np.median(lge[label == 200])
    assert np.median(t2[label == 1220]) > 1.3 * np.median(t2[label == 200])


@pytest.mark.realdata
def test_myops_phantom_matches_the_real_release_conventions(myops_dir, real_data_root):
    real = os.path.join(real_data_root, "myops2020", "train", "Case3001")
    out, _ = myops_dir
    real_grids = set()
    for suffix in ("C0", "LGE", "T2", "gd"):
        real_image = sitk.ReadImage(os.path.join(real, f"Case3001_{suffix}.nii.gz"))
        fake_image = sitk.ReadImage(str(out / "Case3001" / f"Case3001_{suffix}.nii.gz"))
        assert fake_image.GetPixelID() == real_image.GetPixelID(), suffix
        assert fake_image.GetDimension() == real_image.GetDimension()
        real_grids.add(_geometry(real_image))
    assert len(real_grids) == 1, "the real sequences share one grid, as the phantom's do"
    real_codes = set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(real, "Case3001_gd.nii.gz")))))
    assert real_codes == {0, 200, 500, 600, 1220, 2221}


# --------------------------------------------------------------------------------- MM-WHS
@pytest.fixture(scope="module")
def mmwhs_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("mmwhs")
    return out, phantom.write_mmwhs_phantom(str(out), n_per_modality=2, seed=1, first_id=1001, size=40)


def test_mmwhs_layout_codes_geometry(mmwhs_dir):
    out, paths = mmwhs_dir
    expected = {f"{m}_train_{i}_{kind}.nii.gz" for m in ("ct", "mr") for i in (1001, 1002)
                for kind in ("image", "label")}
    assert set(os.listdir(out)) == expected | {PHANTOM_MARKER}
    assert sorted(os.path.basename(p) for p in paths) == sorted(expected)
    for modality in ("ct", "mr"):
        for case_id in (1001, 1002):
            image, array = _read(str(out / f"{modality}_train_{case_id}_image.nii.gz"))
            label_image, label = _read(str(out / f"{modality}_train_{case_id}_label.nii.gz"))
            assert set(np.unique(label).tolist()) == {0, 205, 420, 500, 550, 600, 820, 850}
            assert _geometry(image) == _geometry(label_image)
            assert image.GetPixelID() == sitk.sitkInt16 and label_image.GetPixelID() == sitk.sitkInt16
            assert image.GetSize() == (40, 40, 40)
            spacing = np.array(image.GetSpacing())
            assert spacing.max() / spacing.min() < 1.3, "roughly isotropic"
            assert not _touches_border(label) and not label[[0, -1]].any()
            if modality == "ct":  # Hounsfield units
                assert array.min() <= -900
                assert 200 < np.median(array[label == 500]) < 450
                assert 50 < np.median(array[label == 205]) < 170
            else:
                assert array.min() >= 0


def test_mmwhs_ct_and_mr_differ_in_contrast():
    ct = phantom.mmwhs_case_volume("ct", 1001, seed=0, size=40)
    mr = phantom.mmwhs_case_volume("mr", 1001, seed=0, size=40)
    # CT: soft-tissue body darker than myocardium; whole-heart MR: body close to or above it,
    # and the background (air, lungs) sits at -1000 HU in CT but near zero in MR.
    def body_to_myocardium(volume):
        return np.median(volume.image[volume.label == 205]) - np.median(volume.image[volume.label == 0])
    assert np.median(ct.image[ct.label == 0]) < -200 < 0 <= np.median(mr.image[mr.label == 0])
    assert body_to_myocardium(ct) > 0 and body_to_myocardium(mr) > 0
    assert not np.array_equal(ct.label, mr.label), "CT and MR of one ID are different subjects"


def test_mmwhs_seeded(tmp_path):
    a = phantom.mmwhs_case_volume("mr", 1003, seed=7, size=32)
    b = phantom.mmwhs_case_volume("mr", 1003, seed=7, size=32)
    c = phantom.mmwhs_case_volume("mr", 1003, seed=8, size=32)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.label, b.label) and a.spacing == b.spacing
    assert not np.array_equal(a.image, c.image)


# ------------------------------------------------------------------------------------ CLI
@pytest.mark.parametrize("layout, expected", [
    ("mscmrseg", {"patient1_C0.nii.gz", "patient1_C0_manual.nii.gz", "patient2_T2_manual.nii.gz"}),
    ("myops", {"Case3002"}),
    ("mmwhs", {"ct_train_1002_label.nii.gz", "mr_train_1001_image.nii.gz"}),
])
def test_cli_writes_each_layout(tmp_path, capsys, layout, expected):
    phantom.main(["--layout", layout, "-o", str(tmp_path), "-n", "2", "--seed", "1", "--size",
                  "32" if layout == "mmwhs" else str(SMALL)])
    files = set(os.listdir(tmp_path))
    assert expected | {PHANTOM_MARKER} <= files
    counts = {"mscmrseg": 12, "myops": 2, "mmwhs": 8}
    assert len(files) == counts[layout] + 1
    # the record that lets a converter, and every report, name the data synthetic
    assert read_phantom_marker(str(tmp_path)) == {
        "generator": "nnunetv2_csa.tools.phantom", "layout": layout, "seed": 1,
        **({"n_per_modality": 2, "first_id": 1001, "size": 32} if layout == "mmwhs" else
           {"n_patients": 2, "first_id": 3001, "in_plane_size": SMALL} if layout == "myops" else
           {"n_patients": 2, "modalities": ["C0", "LGE", "T2"], "in_plane_size": SMALL})}
    assert "wrote" in capsys.readouterr().out


def test_cli_help_and_bad_input(tmp_path, capsys):
    with pytest.raises(SystemExit) as help_exit:
        phantom.main(["--help"])
    assert help_exit.value.code == 0
    assert "--layout" in capsys.readouterr().out
    with pytest.raises(SystemExit) as bad_exit:
        phantom.main(["--layout", "myops", "-o", str(tmp_path), "-n", "0"])
    assert bad_exit.value.code == 2
    assert "argument -n: 0 is below the smallest allowed value, 1" in capsys.readouterr().err


def _phantom_cli(tmp_path, capsys, *extra) -> tuple[int, str]:
    """(exit status, stderr) of a one-patient MS-CMRSeg phantom written into tmp_path/out."""
    try:
        phantom.main(["--layout", "mscmrseg", "-o", str(tmp_path / "out"), "-n", "1", "--size", str(SMALL),
                      "--modalities", "LGE", *extra])
        status = 0
    except SystemExit as exit:
        status = exit.code
    return status, capsys.readouterr().err


@pytest.mark.parametrize("users_file", ["patient1_LGE.nii.gz", "notes.txt"])
def test_the_phantom_never_writes_into_a_folder_of_the_users_files(tmp_path, capsys, users_file):
    # a file it would replace, and one it would only label synthetic with its marker
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / users_file).write_bytes(b"the user's data")
    status, stderr = _phantom_cli(tmp_path, capsys)
    assert status == 2 and "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1].endswith(f"holds files the phantom did not write ({users_file}); they "
                                                    f"could be replaced by synthetic ones and its marker would label "
                                                    f"them synthetic: choose a new or empty folder, or add --overwrite")
    assert sorted(os.listdir(tmp_path / "out")) == [users_file]
    assert (tmp_path / "out" / users_file).read_bytes() == b"the user's data"
    # --overwrite is the user's explicit word
    assert _phantom_cli(tmp_path, capsys, "--overwrite")[0] == 0
    assert read_phantom_marker(str(tmp_path / "out"))["layout"] == "mscmrseg"


def test_the_phantom_writes_again_into_its_own_folder_and_refuses_a_file_as_output(tmp_path, capsys):
    assert _phantom_cli(tmp_path, capsys)[0] == 0
    assert _phantom_cli(tmp_path, capsys)[0] == 0  # its marker is there: its own files, rewritten the same
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        phantom.main(["--layout", "mmwhs", "-o", str(tmp_path / "a_file")])
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert stderr.strip().splitlines()[-1].endswith(f"-o {tmp_path / 'a_file'} is a file; give a folder")

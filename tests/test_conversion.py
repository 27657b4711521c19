"""The dataset converters on phantom files in each challenge's layout, and on bad input."""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import types
import warnings

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import given, settings, strategies as st

from dataset_conversion import ConversionError, ConversionWarning, convert_mmwhs, convert_mscmrseg, convert_myops
from dataset_conversion import common, mmwhs, mscmrseg, myops
from dataset_conversion.cases import SourceCase, crop_box
from dataset_conversion.splits import make_patient_splits, select_unpaired
from dataset_conversion.staging import claim_dataset_id, dataset_folder_name
from nnunetv2_csa.modality import read_modality_tags
from nnunetv2_csa.tools.phantom import write_mmwhs_phantom, write_mscmrseg_phantom, write_myops_phantom

NNUNET_VARIABLES = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
MSCMRSEG_CODES = {0: 0, 200: 1, 500: 2, 600: 3}
MYOPS_MERGED = {0: 0, 200: 1, 500: 2, 600: 3, 1220: 1, 2221: 1}
MYOPS_KEPT = {0: 0, 200: 1, 500: 2, 600: 3, 1220: 4, 2221: 5}
MMWHS_PAPER = {0: 0, 205: 1, 420: 2, 500: 3, 550: 0, 600: 0, 820: 4, 850: 0}
MMWHS_ALL = {0: 0, 205: 1, 420: 2, 500: 3, 550: 4, 600: 5, 820: 6, 850: 7}


# ----------------------------------------------------------------------------- helpers
@pytest.fixture(autouse=True)
def no_nnunet_variables(monkeypatch):
    """Tests never see (or write into) the caller's nnU-Net folders."""
    for variable in NNUNET_VARIABLES:
        monkeypatch.delenv(variable, raising=False)


def _convert_isolated(convert, *args, **kwargs) -> str:
    with pytest.MonkeyPatch.context() as patch:
        for variable in NNUNET_VARIABLES:
            patch.delenv(variable, raising=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConversionWarning)
            return convert(*args, **kwargs)


def snapshot(folder: str) -> dict:
    """Content hash and mtime of every file under ``folder``."""
    state = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                state[os.path.relpath(path, folder)] = (hashlib.sha256(f.read()).hexdigest(), os.stat(path).st_mtime_ns)
    return state


def array(path: str) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(path))


def load_json(path: str):
    with open(path) as f:
        return json.load(f)


def remapped(source_label: np.ndarray, mapping: dict[int, int]) -> np.ndarray:
    expected = np.full(source_label.shape, 255, dtype=np.uint8)
    for code, cls in mapping.items():
        expected[source_label == code] = cls
    assert (expected != 255).all(), "the source holds codes the test does not know"
    return expected


def assert_same_geometry(a: sitk.Image, b: sitk.Image):
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), rtol=1e-6)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)


def assert_nothing_written(output_root: str):
    assert not os.path.exists(output_root) or os.listdir(output_root) == [], os.listdir(output_root)


def check_integrity(folder: str):
    """nnU-Net's verify_dataset_integrity, with its spawn pool replaced by an in-process one
    (the same checks, without starting a worker that imports torch again)."""
    from nnunetv2.experiment_planning import verify_dataset_integrity as vdi

    class InProcessPool:
        def __init__(self, *_):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *_):
            return False

        def starmap(self, function, arguments):
            return [function(*a) for a in arguments]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(vdi, "multiprocessing",
                      types.SimpleNamespace(get_context=lambda _: types.SimpleNamespace(Pool=InProcessPool)))
        vdi.verify_dataset_integrity(folder, num_processes=1)


def assert_splits_grouped(splits: list, case_patient: dict, n_folds: int):
    assert len(splits) == n_folds
    cases = set(case_patient)
    val_seen = []
    for fold in splits:
        train, val = set(fold["train"]), set(fold["val"])
        assert train.isdisjoint(val) and train | val == cases and val
        assert {case_patient[c] for c in train}.isdisjoint({case_patient[c] for c in val})
        val_seen += fold["val"]
    if n_folds > 1:  # cross-validation: every case validated exactly once
        assert sorted(val_seen) == sorted(cases)


# ----------------------------------------------------------------------------- phantom sources
@pytest.fixture(scope="module")
def mscmrseg_source(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("mscmrseg_src"))
    # a nested layout as in the real release (images and labels in different folders)
    write_mscmrseg_phantom(os.path.join(folder, "images"), n_patients=6, unlabelled={"LGE": [6]},
                           in_plane_size=48)
    os.makedirs(os.path.join(folder, "labels"))
    for name in os.listdir(os.path.join(folder, "images")):
        if name.endswith("_manual.nii.gz"):
            os.rename(os.path.join(folder, "images", name), os.path.join(folder, "labels", name))
    return folder


@pytest.fixture(scope="module")
def mmwhs_source(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("mmwhs_src"))
    write_mmwhs_phantom(folder, n_per_modality=5, size=32)
    return folder


@pytest.fixture(scope="module")
def myops_source(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("myops_src"))
    write_myops_phantom(os.path.join(folder, "train"), n_patients=5, in_plane_size=48)
    return folder


@pytest.fixture(scope="module")
def mscmrseg_dataset(mscmrseg_source, tmp_path_factory):
    before = snapshot(mscmrseg_source)
    out = str(tmp_path_factory.mktemp("raw"))
    folder = _convert_isolated(convert_mscmrseg, mscmrseg_source, 501, out, modalities=("LGE", "C0"))
    assert snapshot(mscmrseg_source) == before
    return folder


@pytest.fixture(scope="module")
def mmwhs_dataset(mmwhs_source, tmp_path_factory):
    before = snapshot(mmwhs_source)
    folder = _convert_isolated(convert_mmwhs, mmwhs_source, 502, str(tmp_path_factory.mktemp("raw")),
                               num_processes=1)
    assert snapshot(mmwhs_source) == before
    return folder


@pytest.fixture(scope="module")
def myops_dataset(myops_source, tmp_path_factory):
    before = snapshot(myops_source)
    folder = _convert_isolated(convert_myops, myops_source, 503, str(tmp_path_factory.mktemp("raw")))
    assert snapshot(myops_source) == before
    return folder


# ----------------------------------------------------------------------------- MS-CMRSeg
def test_mscmrseg_layout_tags_and_json(mscmrseg_dataset):
    assert os.path.basename(mscmrseg_dataset) == "Dataset501_MSCMRSeg2019"
    dataset_json = load_json(os.path.join(mscmrseg_dataset, "dataset.json"))
    assert dataset_json["channel_names"] == {"0": "zscore"}
    assert dataset_json["labels"] == {"background": 0, "myocardium": 1, "left_ventricle": 2, "right_ventricle": 3}
    assert dataset_json["file_ending"] == ".nii.gz"
    # patient 6 has no LGE label: left out
    expected_cases = {f"patient{p:03d}_C0" for p in range(1, 7)} | {f"patient{p:03d}_LGE" for p in range(1, 6)}
    assert dataset_json["numTraining"] == len(expected_cases)
    assert set(os.listdir(os.path.join(mscmrseg_dataset, "imagesTr"))) == {f"{c}_0000.nii.gz" for c in expected_cases}
    assert set(os.listdir(os.path.join(mscmrseg_dataset, "labelsTr"))) == {f"{c}.nii.gz" for c in expected_cases}
    assert not os.path.exists(os.path.join(mscmrseg_dataset, "imagesTs"))
    tags = read_modality_tags(mscmrseg_dataset)
    assert tags.modalities == ("LGE", "C0")
    assert tags.index_of_case("patient003_LGE") == 0 and tags.index_of_case("patient003_C0") == 1
    assert set(tags.case_modality) == expected_cases
    assert dataset_json["csa_case_patient"]["patient004_C0"] == "patient004"
    assert dataset_json["csa_conversion"]["modalities"] == ["LGE", "C0"]
    # the phantom generator's record travels into dataset.json: no report can mistake it for MS-CMRSeg
    assert dataset_json["csa_conversion"]["phantom"]["layout"] == "mscmrseg"
    assert dataset_json["description"].startswith("SYNTHETIC phantom in the MS-CMRSeg 2019 layout")


def test_mscmrseg_labels_remapped_voxelwise_and_geometry_kept(mscmrseg_dataset, mscmrseg_source):
    for patient, modality in [(1, "LGE"), (4, "C0"), (6, "C0")]:
        case = f"patient{patient:03d}_{modality}"
        source_image = os.path.join(mscmrseg_source, "images", f"patient{patient}_{modality}.nii.gz")
        source_label = os.path.join(mscmrseg_source, "labels", f"patient{patient}_{modality}_manual.nii.gz")
        out_image = os.path.join(mscmrseg_dataset, "imagesTr", f"{case}_0000.nii.gz")
        out_label = os.path.join(mscmrseg_dataset, "labelsTr", f"{case}.nii.gz")
        np.testing.assert_array_equal(array(out_label), remapped(array(source_label), MSCMRSEG_CODES))
        np.testing.assert_array_equal(array(out_image), array(source_image))
        assert sitk.ReadImage(out_label).GetPixelID() == sitk.sitkUInt8
        assert_same_geometry(sitk.ReadImage(out_image), sitk.ReadImage(source_image))
        assert_same_geometry(sitk.ReadImage(out_label), sitk.ReadImage(source_image))


def test_mscmrseg_integrity_and_splits(mscmrseg_dataset):
    check_integrity(mscmrseg_dataset)
    dataset_json = load_json(os.path.join(mscmrseg_dataset, "dataset.json"))
    splits = load_json(os.path.join(mscmrseg_dataset, "splits_final.json"))
    assert_splits_grouped(splits, dataset_json["csa_case_patient"], 5)


def test_mscmrseg_unlabelled_to_imagesTs_and_single_modality(mscmrseg_source, tmp_path):
    with pytest.warns(ConversionWarning, match="patient6_LGE"):
        folder = convert_mscmrseg(mscmrseg_source, 7, str(tmp_path), modalities=["T2", "LGE"],
                                  unlabelled_to_imagesTs=True)
    assert os.listdir(os.path.join(folder, "imagesTs")) == ["patient006_LGE_0000.nii.gz"]
    assert read_modality_tags(folder).modalities == ("T2", "LGE")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConversionWarning)
        single = convert_mscmrseg(mscmrseg_source, 8, str(tmp_path), modalities=["T2"], name="T2only")
    assert os.path.basename(single) == "Dataset008_T2only"
    assert set(read_modality_tags(single).case_modality.values()) == {"T2"}


# ----------------------------------------------------------------------------- MM-WHS
def test_mmwhs_case_names_patients_and_paper_labels(mmwhs_dataset, mmwhs_source):
    dataset_json = load_json(os.path.join(mmwhs_dataset, "dataset.json"))
    assert dataset_json["labels"] == {"background": 0, "LV_myocardium": 1, "left_atrium": 2,
                                      "LV_blood_cavity": 3, "ascending_aorta": 4}
    tags = read_modality_tags(mmwhs_dataset)
    assert tags.modalities == ("CT", "MR")
    assert tags.modality_of_case("ct1001_CT") == "CT" and tags.modality_of_case("mr1005_MR") == "MR"
    # the CT and the MR with the same number are two different people
    assert dataset_json["csa_case_patient"]["ct1001_CT"] == "ct1001"
    assert dataset_json["csa_case_patient"]["mr1001_MR"] == "mr1001"
    assert dataset_json["numTraining"] == 10
    for modality, number in [("ct", 1002), ("mr", 1004)]:
        case = f"{modality}{number}_{modality.upper()}"
        source = os.path.join(mmwhs_source, f"{modality}_train_{number}_label.nii.gz")
        out = os.path.join(mmwhs_dataset, "labelsTr", f"{case}.nii.gz")
        np.testing.assert_array_equal(array(out), remapped(array(source), MMWHS_PAPER))
        assert_same_geometry(sitk.ReadImage(out), sitk.ReadImage(source))
    check_integrity(mmwhs_dataset)
    assert_splits_grouped(load_json(os.path.join(mmwhs_dataset, "splits_final.json")),
                          dataset_json["csa_case_patient"], 5)


def test_mmwhs_all_structures(mmwhs_source, tmp_path):
    folder = _convert_isolated(convert_mmwhs, mmwhs_source, 9, str(tmp_path), all_structures=True,
                               modalities=["MR"], split="80-20")
    assert len(load_json(os.path.join(folder, "dataset.json"))["labels"]) == 8
    source = array(os.path.join(mmwhs_source, "mr_train_1003_label.nii.gz"))
    np.testing.assert_array_equal(array(os.path.join(folder, "labelsTr", "mr1003_MR.nii.gz")),
                                  remapped(source, MMWHS_ALL))
    assert load_json(os.path.join(folder, "dataset.json"))["csa_conversion"]["all_structures"] is True


def test_mmwhs_421_quirk_mapped_to_left_atrium_with_a_warning(mmwhs_source, tmp_path):
    source = str(tmp_path / "src")
    shutil.copytree(mmwhs_source, source)
    quirky = os.path.join(source, "mr_train_1002_label.nii.gz")
    label = sitk.ReadImage(quirky)
    codes = sitk.GetArrayFromImage(label)
    original = codes.copy()
    left_atrium = np.argwhere(codes == 420)
    codes[tuple(left_atrium[: len(left_atrium) // 2].T)] = 421  # half the atrium as in mr_train_1010
    fixed = sitk.GetImageFromArray(codes)
    fixed.CopyInformation(label)
    sitk.WriteImage(fixed, quirky)
    with pytest.warns(ConversionWarning, match=r"mr_train_1002_label\.nii\.gz: code 421 mapped to 420") as record:
        folder = convert_mmwhs(source, 10, str(tmp_path / "raw"))
    assert sum("421" in str(w.message) for w in record) == 1  # only the file that has it
    np.testing.assert_array_equal(array(os.path.join(folder, "labelsTr", "mr1002_MR.nii.gz")),
                                  remapped(original, MMWHS_PAPER))


def test_mmwhs_coronal_orientation(mmwhs_source, tmp_path):
    with pytest.warns(ConversionWarning, match="coronal") as record:
        folder = convert_mmwhs(mmwhs_source, 11, str(tmp_path), coronal=True)
    # phantom CT has thicker axial slices: nnU-Net would slice axially, and the user is told
    assert any("ct1001_CT" in str(w.message) for w in record)
    for case, stem in [("ct1001_CT", "ct_train_1001"), ("mr1002_MR", "mr_train_1002")]:
        image = sitk.ReadImage(os.path.join(folder, "imagesTr", f"{case}_0000.nii.gz"))
        label = sitk.ReadImage(os.path.join(folder, "labelsTr", f"{case}.nii.gz"))
        for volume in (image, label):
            assert sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(volume.GetDirection()) == "LIP"
        assert_same_geometry(image, label)
        source_image = sitk.ReadImage(os.path.join(mmwhs_source, f"{stem}_image.nii.gz"))
        source_label = array(os.path.join(mmwhs_source, f"{stem}_label.nii.gz"))
        # the phantom is LPS (identity): LIP puts the anterior-posterior axis (numpy axis 1 of the
        # source) first, and flips superior-inferior
        assert image.GetSize() == (source_image.GetSize()[0], source_image.GetSize()[2], source_image.GetSize()[1])
        np.testing.assert_array_equal(sitk.GetArrayFromImage(image),
                                      np.transpose(sitk.GetArrayFromImage(source_image), (1, 0, 2))[:, ::-1, :])
        # every voxel keeps its physical position: back to LPS gives the source exactly
        back = sitk.DICOMOrient(label, "LPS")
        assert_same_geometry(back, source_image)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(back), remapped(source_label, MMWHS_PAPER))
    assert load_json(os.path.join(folder, "dataset.json"))["csa_conversion"]["coronal"] is True
    check_integrity(folder)


def test_coronal_warning_logic():
    from dataset_conversion.cases import CaseResult
    isotropic = [CaseResult("a_CT", (1,), (1.0, 1.0, 1.0), []), CaseResult("b_CT", (1,), (0.8, 0.8, 0.8), [])]
    assert mmwhs.coronal_spacing_warnings(isotropic, 7) == []  # ties keep the coronal axis first
    assert mmwhs.coronal_target_spacing(isotropic) is None
    thick_coronal = [CaseResult("a_MR", (1,), (1.0, 1.0, 2.0), [])]
    assert mmwhs.coronal_spacing_warnings(thick_coronal, 7) == []
    thin_coronal = [CaseResult("a_CT", (1,), (0.4, 0.6, 0.4), [])]
    # (z, y, x) = (0.4, 0.6, 0.4): the A-P value is raised to the largest, the in-plane ones stay
    target = mmwhs.coronal_target_spacing(thin_coronal)
    assert target == [0.6, 0.6, 0.4] and int(np.argmax(target)) == 0
    messages = mmwhs.coronal_spacing_warnings(thin_coronal, 7)
    assert len(messages) == 2 and "a_CT" in messages[0] and "would NOT slice this dataset coronally" in messages[1]
    assert "nnUNetv2_plan_experiment -d 7 -overwrite_target_spacing 0.6 0.6 0.4 &&" in messages[1]


@pytest.mark.integration
def test_coronal_conversion_plans_coronal_2d_slices_with_the_printed_command(coronal_volume_dataset, tmp_path):
    from conftest import run_command

    env, dataset_name, printed = coronal_volume_dataset
    command = re.search(r"nnUNetv2_plan_experiment -d \d+ -overwrite_target_spacing [\d.e-]+ [\d.e-]+ [\d.e-]+",
                        printed).group(0)
    # nnU-Net's default plan, made from the same fingerprint by nnUNetv2_plan_and_preprocess (the fixture)
    default = load_json(os.path.join(env["nnUNet_preprocessed"], dataset_name, "nnUNetPlans.json"))
    # the printed planning command, run as printed on a copy of the fingerprint (the fixture's plan stays)
    plans_folder = tmp_path / "nnUNet_preprocessed" / dataset_name
    plans_folder.mkdir(parents=True)
    shutil.copy(os.path.join(env["nnUNet_preprocessed"], dataset_name, "dataset_fingerprint.json"), plans_folder)
    run_command(command.split(), dict(env, nnUNet_preprocessed=str(tmp_path / "nnUNet_preprocessed")))
    coronal = load_json(plans_folder / "nnUNetPlans.json")
    # the problem: the default plan slices along another axis than the anterior-posterior one (axis 0 after LIP)
    assert default["transpose_forward"][0] != 0
    # the printed command: 2d slices are coronal (axis 0 first) with the data's own in-plane spacing
    assert coronal["transpose_forward"] == [0, 1, 2]
    median_zyx = np.percentile(np.array(load_json(plans_folder / "dataset_fingerprint.json")["spacings"]), 50, axis=0)
    np.testing.assert_allclose(coronal["configurations"]["2d"]["spacing"], median_zyx[1:], rtol=1e-5)


# ----------------------------------------------------------------------------- MyoPS
def test_myops_layout_shared_label_and_merge(myops_dataset, myops_source):
    assert os.path.basename(myops_dataset) == "Dataset503_MyoPS2020"
    dataset_json = load_json(os.path.join(myops_dataset, "dataset.json"))
    assert dataset_json["numTraining"] == 10 and len(dataset_json["labels"]) == 4
    tags = read_modality_tags(myops_dataset)
    assert tags.modalities == ("C0", "LGE")
    assert tags.cases_of_modality("LGE") == [f"Case{i}_LGE" for i in range(3001, 3006)]
    gd = array(os.path.join(myops_source, "train", "Case3002", "Case3002_gd.nii.gz"))
    assert {1220, 2221} <= set(np.unique(gd).tolist())  # the merge is really exercised
    for modality in ("C0", "LGE"):
        out = os.path.join(myops_dataset, "labelsTr", f"Case3002_{modality}.nii.gz")
        np.testing.assert_array_equal(array(out), remapped(gd, MYOPS_MERGED))
        source_image = os.path.join(myops_source, "train", "Case3002", f"Case3002_{modality}.nii.gz")
        assert_same_geometry(sitk.ReadImage(out), sitk.ReadImage(source_image))
    check_integrity(myops_dataset)
    assert_splits_grouped(load_json(os.path.join(myops_dataset, "splits_final.json")),
                          dataset_json["csa_case_patient"], 5)


def test_myops_keep_pathology(myops_source, tmp_path):
    folder = _convert_isolated(convert_myops, myops_source, 12, str(tmp_path), keep_pathology=True,
                               modalities=["T2"], split="80-20")
    labels = load_json(os.path.join(folder, "dataset.json"))["labels"]
    assert labels["edema"] == 4 and labels["scar"] == 5
    gd = array(os.path.join(myops_source, "train", "Case3004", "Case3004_gd.nii.gz"))
    np.testing.assert_array_equal(array(os.path.join(folder, "labelsTr", "Case3004_T2.nii.gz")),
                                  remapped(gd, MYOPS_KEPT))


def test_worker_processes_give_the_same_dataset(myops_source, myops_dataset, tmp_path):
    folder = _convert_isolated(convert_myops, myops_source, 503, str(tmp_path), num_processes=2)
    assert sorted(os.listdir(os.path.join(folder, "labelsTr"))) == \
        sorted(os.listdir(os.path.join(myops_dataset, "labelsTr")))
    for name in ("Case3001_LGE.nii.gz", "Case3005_C0.nii.gz"):
        np.testing.assert_array_equal(array(os.path.join(folder, "labelsTr", name)),
                                      array(os.path.join(myops_dataset, "labelsTr", name)))
    assert load_json(os.path.join(folder, "splits_final.json")) == \
        load_json(os.path.join(myops_dataset, "splits_final.json"))


# ----------------------------------------------------------------------------- crop
def test_crop_size_and_physical_position(myops_source, tmp_path):
    height, width = 64, 30  # taller than the 48-pixel phantom: padded; narrower: cropped
    folder = _convert_isolated(convert_myops, myops_source, 13, str(tmp_path), crop=(height, width))
    assert load_json(os.path.join(folder, "dataset.json"))["csa_conversion"]["crop"] == [height, width]
    for case in ("Case3001", "Case3003"):
        source_image = sitk.ReadImage(os.path.join(myops_source, "train", case, f"{case}_LGE.nii.gz"))
        gd = sitk.ReadImage(os.path.join(myops_source, "train", case, f"{case}_gd.nii.gz"))
        image = sitk.ReadImage(os.path.join(folder, "imagesTr", f"{case}_LGE_0000.nii.gz"))
        label = sitk.ReadImage(os.path.join(folder, "labelsTr", f"{case}_LGE.nii.gz"))
        assert image.GetSize() == label.GetSize() == (width, height, source_image.GetSize()[2])
        assert_same_geometry(image, label)
        np.testing.assert_allclose(image.GetDirection(), source_image.GetDirection(), atol=1e-6)
        # the crop sits where the source voxels were: resampling the source onto the cropped grid
        # (outside: the image minimum, as the padding) gives the cropped volumes exactly
        minimum = float(sitk.GetArrayViewFromImage(source_image).min())
        resampled = sitk.Resample(source_image, image, sitk.Transform(), sitk.sitkNearestNeighbor, minimum)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(resampled), sitk.GetArrayFromImage(image))
        resampled_label = sitk.Resample(gd, label, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
        np.testing.assert_array_equal(remapped(sitk.GetArrayFromImage(resampled_label), MYOPS_MERGED),
                                      sitk.GetArrayFromImage(label))
        # centred on the heart: the cropped label's bounding box is centred (within a pixel)
        # along the cropped (narrower) axis, and the heart is complete
        heart = sitk.GetArrayFromImage(label).any(axis=0)
        assert heart.sum() == (remapped(sitk.GetArrayFromImage(gd), MYOPS_MERGED) > 0).any(axis=0).sum()
        columns = np.flatnonzero(heart.any(axis=0))
        assert abs((columns[0] + columns[-1] + 1) / 2 - width / 2) <= 1
    check_integrity(folder)


def test_crop_box_centres_on_the_foreground():
    foreground = np.zeros((20, 30), dtype=bool)
    foreground[4:8, 10:16] = True  # bounding box rows 4..7, columns 10..15
    start, size = crop_box(foreground, (20, 30), (6, 4))
    assert start == (3, 11) and size == (4, 6)
    start, _ = crop_box(foreground, (20, 30), (40, 40))  # larger than the image: negative start
    assert start == (-14, -7)
    start, size = crop_box(None, (20, 30), (10, 10))  # no label: the image centre
    assert start == (5, 10) and size == (20, 30)


# ----------------------------------------------------------------------------- splits
def test_80_20_split_is_one_grouped_fold(mscmrseg_source, tmp_path):
    folder = _convert_isolated(convert_mscmrseg, mscmrseg_source, 14, str(tmp_path), split="80-20", seed=3)
    dataset_json = load_json(os.path.join(folder, "dataset.json"))
    splits = load_json(os.path.join(folder, "splits_final.json"))
    assert_splits_grouped(splits, dataset_json["csa_case_patient"], 1)
    val_patients = {dataset_json["csa_case_patient"][c] for c in splits[0]["val"]}
    assert len(val_patients) == 1  # 20 % of 6 patients
    assert dataset_json["csa_conversion"]["split"] == "80-20" and dataset_json["csa_conversion"]["seed"] == 3


def test_unpaired_keeps_one_modality_per_patient(mmwhs_source, myops_source, tmp_path):
    folder = _convert_isolated(convert_myops, myops_source, 15, str(tmp_path), unpaired=True, split="80-20")
    dataset_json = load_json(os.path.join(folder, "dataset.json"))
    patients = list(dataset_json["csa_case_patient"].values())
    assert sorted(patients) == [f"Case{i}" for i in range(3001, 3006)]  # each patient once
    modalities = list(dataset_json["csa_case_modality"].values())
    assert abs(modalities.count("C0") - modalities.count("LGE")) <= 1
    assert dataset_json["numTraining"] == 5 and len(os.listdir(os.path.join(folder, "imagesTr"))) == 5
    assert dataset_json["csa_conversion"]["unpaired"] is True
    check_integrity(folder)
    # the image each patient did not contribute is kept apart, as test material, with its label
    other = dataset_json["csa_other_modality_cases"]
    trained = dataset_json["csa_case_modality"]
    assert len(other) == 5 and not set(other) & set(trained)
    for case, tag in other.items():
        assert case == f"{tag['patient']}_{tag['modality']}"
        assert trained[f"{tag['patient']}_{'LGE' if tag['modality'] == 'C0' else 'C0'}"] != tag["modality"]
        image = sitk.ReadImage(os.path.join(folder, "imagesOtherModality", f"{case}_0000.nii.gz"))
        label = sitk.ReadImage(os.path.join(folder, "labelsOtherModality", f"{case}.nii.gz"))
        assert image.GetSize() == label.GetSize()
        assert set(np.unique(sitk.GetArrayFromImage(label))) <= {0, 1, 2, 3}
    paired = _convert_isolated(convert_myops, myops_source, 17, str(tmp_path), split="80-20")
    assert "csa_other_modality_cases" not in load_json(os.path.join(paired, "dataset.json"))
    assert not os.path.exists(os.path.join(paired, "imagesOtherModality"))
    with pytest.raises(ConversionError, match="at least two modalities"):
        _convert_isolated(convert_myops, myops_source, 16, str(tmp_path), unpaired=True, modalities=["C0"])


def test_splits_copied_to_nnunet_preprocessed(myops_source, tmp_path, monkeypatch):
    preprocessed = tmp_path / "preprocessed"
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    monkeypatch.setenv("nnUNet_preprocessed", str(preprocessed))
    stale = preprocessed / "Dataset017_MyoPS2020" / "splits_final.json"
    stale.parent.mkdir(parents=True)
    stale.write_text('[{"train": ["x"], "val": ["y"]}]')
    with pytest.warns(ConversionWarning, match="replaced .*splits_final.json"):
        folder = convert_myops(myops_source, 17)
    assert folder == str(tmp_path / "raw" / "Dataset017_MyoPS2020")
    assert load_json(str(stale)) == load_json(os.path.join(folder, "splits_final.json"))


@pytest.mark.parametrize("content", ["", "{not json"])
def test_a_malformed_preprocessed_split_is_named_and_replaced(myops_source, tmp_path, monkeypatch, content):
    preprocessed = tmp_path / "preprocessed"
    monkeypatch.setenv("nnUNet_preprocessed", str(preprocessed))
    broken = preprocessed / "Dataset019_MyoPS2020" / "splits_final.json"
    broken.parent.mkdir(parents=True)
    broken.write_text(content)
    with pytest.warns(ConversionWarning, match=r"replaced .*Dataset019_MyoPS2020/splits_final\.json: it was not a "
                                               r"readable split"):
        folder = convert_myops(myops_source, 19, str(tmp_path / "raw"))
    assert load_json(str(broken)) == load_json(os.path.join(folder, "splits_final.json"))


def test_an_unwritable_preprocessed_folder_leaves_no_raw_dataset_behind(myops_source, tmp_path, monkeypatch):
    # a plain file where nnU-Net's preprocessed dataset folder should be: unwritable even for root
    preprocessed = tmp_path / "preprocessed"
    preprocessed.mkdir()
    (preprocessed / "Dataset020_MyoPS2020").write_text("not a folder")
    monkeypatch.setenv("nnUNet_preprocessed", str(preprocessed))
    for attempt in range(2):  # a rerun meets the same clean state, not a half-written dataset
        with pytest.raises(ConversionError, match=r"cannot write .*Dataset020_MyoPS2020/splits_final\.json"):
            convert_myops(myops_source, 20, str(tmp_path / "raw"))
        assert_nothing_written(str(tmp_path / "raw"))
    assert os.listdir(preprocessed) == ["Dataset020_MyoPS2020"]


def test_a_failed_split_commit_rolls_the_raw_dataset_back(myops_source, tmp_path, monkeypatch):
    # the last step of the transaction fails: the raw dataset that was just moved into place goes back
    import dataset_conversion.common as common
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "preprocessed"))
    real_replace = os.replace

    def failing_replace(source, target):
        if str(target).endswith("splits_final.json"):
            raise OSError(28, "No space left on device")
        return real_replace(source, target)

    monkeypatch.setattr(common.os, "replace", failing_replace)
    with pytest.raises(ConversionError, match="No space left on device.*nothing was changed"):
        convert_myops(myops_source, 21, str(tmp_path / "raw"))
    assert_nothing_written(str(tmp_path / "raw"))
    assert not (tmp_path / "preprocessed").exists()


def test_preprocessed_folder_of_another_name_is_refused(myops_source, tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "pre"))
    (tmp_path / "pre" / "Dataset018_Other").mkdir(parents=True)
    with pytest.raises(ConversionError, match="Dataset018_Other"):
        convert_myops(myops_source, 18, str(tmp_path / "raw"))
    assert_nothing_written(str(tmp_path / "raw"))


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.integers(0, 40), st.sets(st.sampled_from(["A", "B", "C"]), min_size=1),
                       min_size=5, max_size=25),
       st.sampled_from(["5-fold", "80-20"]), st.integers(0, 2 ** 31 - 1))
def test_splits_never_split_a_patient(patients, split, seed):
    case_patient = {f"p{p}_{m}": f"p{p}" for p, mods in patients.items() for m in mods}
    splits = make_patient_splits(case_patient, split, seed)
    assert_splits_grouped(splits, case_patient, 5 if split == "5-fold" else 1)
    assert make_patient_splits(case_patient, split, seed) == splits  # seeded
    if split == "80-20":
        n_val = len({case_patient[c] for c in splits[0]["val"]})
        assert n_val == max(1, round(0.2 * len(patients)))


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.integers(0, 40), st.sets(st.sampled_from(["A", "B", "C"]), min_size=1),
                       min_size=5, max_size=25), st.integers(0, 2 ** 31 - 1))
def test_five_fold_splits_spread_each_modality_stratum_evenly(patients, seed):
    case_patient = {f"p{p}_{m}": f"p{p}" for p, mods in patients.items() for m in mods}
    case_modality = {f"p{p}_{m}": m for p, mods in patients.items() for m in mods}
    splits = make_patient_splits(case_patient, "5-fold", seed, case_modality)
    assert_splits_grouped(splits, case_patient, 5)
    strata = {f"p{p}": tuple(sorted(mods)) for p, mods in patients.items()}
    for stratum in set(strata.values()):
        per_fold = [len({case_patient[c] for c in fold["val"] if strata[case_patient[c]] == stratum})
                    for fold in splits]
        assert max(per_fold) - min(per_fold) <= 1, (stratum, per_fold)


def test_unpaired_five_patients_five_folds_is_refused_naming_the_folds(myops_source, tmp_path):
    # 5 patients, one modality each: every fold validates one patient, so one modality is
    # missing from every fold's validation part; the trainer would refuse each fold
    _expect_failure(convert_myops, myops_source, str(tmp_path / "raw"),
                    r"fold 0 validation has no (C0|LGE).*fold 4 validation has no (C0|LGE).*--split 80-20",
                    unpaired=True, modalities=("C0", "LGE"))


def test_partial_labels_five_folds_refused_and_80_20_keeps_every_modality_in_both_parts(tmp_path):
    # MS-CMRSeg layout: LGE labelled for 3 of 10 patients
    source = str(tmp_path / "src")
    write_mscmrseg_phantom(source, n_patients=10, modalities=("LGE", "C0"), unlabelled={"LGE": list(range(4, 11))},
                           in_plane_size=48)
    _expect_failure(convert_mscmrseg, source, str(tmp_path / "raw"),
                    r"5-fold split cannot give every fold all modalities: fold \d validation has no LGE",
                    modalities=("LGE", "C0"))
    folder = _convert_isolated(convert_mscmrseg, source, 34, str(tmp_path / "raw2"), modalities=("LGE", "C0"),
                               split="80-20")
    dataset_json = load_json(os.path.join(folder, "dataset.json"))
    fold = load_json(os.path.join(folder, "splits_final.json"))[0]
    for part in ("train", "val"):
        assert {dataset_json["csa_case_modality"][c] for c in fold[part]} == {"LGE", "C0"}, part


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.integers(0, 40), st.sets(st.sampled_from(["A", "B"]), min_size=1), min_size=1),
       st.integers(0, 2 ** 31 - 1))
def test_unpaired_selection_is_one_case_per_patient_and_balanced(patients, seed):
    cases = [SourceCase(f"p{p}", m, f"p{p}_{m}.nii.gz", "label") for p, mods in patients.items() for m in mods]
    chosen = select_unpaired(cases, ["A", "B"], seed)
    assert sorted(c.patient for c in chosen) == sorted(f"p{p}" for p in patients)
    assert all(c.modality in patients[int(c.patient[1:])] for c in chosen)
    if all(len(m) == 2 for m in patients.values()):  # complete pairs: alternate, balanced
        counts = [sum(c.modality == m for c in chosen) for m in "AB"]
        assert abs(counts[0] - counts[1]) <= 1


# ----------------------------------------------------------------------------- command line
@pytest.mark.parametrize("module", [mscmrseg, mmwhs, myops])
def test_help(module, capsys):
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    assert "--modalities" in capsys.readouterr().out


def test_main_prints_counts_and_path_and_uses_nnunet_raw(myops_source, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("nnUNet_raw", str(tmp_path))
    assert myops.main(["-i", myops_source, "-d", "19", "--modalities", "LGE", "C0"]) == 0
    out = capsys.readouterr().out
    assert "LGE: 5 training cases" in out and "C0: 5 training cases" in out
    assert str(tmp_path / "Dataset019_MyoPS2020") in out
    assert read_modality_tags(str(tmp_path / "Dataset019_MyoPS2020")).modalities == ("LGE", "C0")


def test_main_reports_errors_on_stderr(myops_source, tmp_path, capsys):
    os.makedirs(tmp_path / "Dataset020_Old")
    assert myops.main(["-i", myops_source, "-o", str(tmp_path), "-d", "20"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Dataset020_Old" in err and "--overwrite" in err


def test_unknown_modality_is_refused(myops_source, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        myops.main(["-i", myops_source, "-o", str(tmp_path), "-d", "21", "--modalities", "FLAIR"])
    assert exit_info.value.code == 2 and "FLAIR" in capsys.readouterr().err
    with pytest.raises(ConversionError, match="unknown modality.*'lge'"):
        convert_myops(myops_source, 21, str(tmp_path), modalities=["C0", "lge"])
    with pytest.raises(ConversionError, match="MR.*twice|twice"):
        convert_mmwhs(myops_source, 21, str(tmp_path), modalities=["MR", "MR"])
    assert_nothing_written(str(tmp_path))


def test_no_output_folder_is_an_error(myops_source):
    with pytest.raises(ConversionError, match="nnUNet_raw"):
        convert_myops(myops_source, 22)


# ----------------------------------------------------------------------------- bad input
@pytest.fixture
def myops_copy(myops_source, tmp_path):
    """A private copy of the MyoPS phantom that a test may damage."""
    folder = str(tmp_path / "src")
    shutil.copytree(myops_source, folder)
    return folder


def _expect_failure(convert, source, output_root, match, **kwargs):
    """The conversion fails with a message matching ``match``, writes nothing and leaves the
    source untouched."""
    before = snapshot(source)
    with pytest.raises(ConversionError, match=match):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConversionWarning)
            convert(source, 30, output_root, **kwargs)
    assert_nothing_written(output_root)
    assert snapshot(source) == before


def _rewrite(path: str, edit):
    image = sitk.ReadImage(path)
    sitk.WriteImage(edit(image), path)


def test_truncated_file(myops_copy, tmp_path):
    path = os.path.join(myops_copy, "train", "Case3004", "Case3004_LGE.nii.gz")
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    # through the worker pool too: the error crosses the process boundary intact
    _expect_failure(convert_myops, myops_copy, str(tmp_path / "raw"), r"Case3004_LGE\.nii\.gz .*truncated",
                    num_processes=2)


def test_truncated_uncompressed_nifti(myops_copy, tmp_path):
    path = os.path.join(myops_copy, "train", "Case3002", "Case3002_gd.nii.gz")
    with gzip.open(path) as f:
        data = f.read()
    os.remove(path)
    with open(path[:-3], "wb") as f:
        f.write(data[: len(data) - 100])
    _expect_failure(convert_myops, myops_copy, str(tmp_path / "raw"), r"Case3002_gd\.nii is truncated")


@pytest.mark.parametrize("ending", [".NII.GZ", ".Nii.Gz", ".NII"])
def test_a_truncated_label_is_an_error_whatever_its_names_case(myops_copy, tmp_path, ending):
    # the converters match names case-insensitively; the truncation check once tested
    # endswith(".gz") and let a truncated .NII.GZ label through with half its voxels zero
    path = os.path.join(myops_copy, "train", "Case3004", "Case3004_gd.nii.gz")
    with (gzip.open if ending == ".NII" else open)(path, "rb") as f:
        data = f.read()
    os.remove(path)
    with open(path[:-len(".nii.gz")] + ending, "wb") as f:
        f.write(data[: len(data) * 2 // 3])
    _expect_failure(convert_myops, myops_copy, str(tmp_path / "raw"),
                    rf"Case3004_gd{re.escape(ending)} (is truncated|is corrupt or truncated)")


def test_a_complete_upper_case_file_name_converts(myops_copy, tmp_path):
    # the negative control of the test above: the name's case alone is no error
    path = os.path.join(myops_copy, "train", "Case3004", "Case3004_gd.nii.gz")
    os.rename(path, path[:-len(".nii.gz")] + ".NII.GZ")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConversionWarning)
        folder = convert_myops(myops_copy, 34, str(tmp_path / "raw"), split="80-20")
    assert os.path.isfile(os.path.join(folder, "labelsTr", "Case3004_C0.nii.gz"))


def test_corrupt_file(myops_copy, tmp_path):
    path = os.path.join(myops_copy, "train", "Case3001", "Case3001_gd.nii.gz")
    with open(path, "wb") as f:
        f.write(b"this is not a nifti file at all")
    _expect_failure(convert_myops, myops_copy, str(tmp_path / "raw"), r"Case3001_gd\.nii\.gz")


def test_unexpected_label_code(myops_copy, tmp_path):
    path = os.path.join(myops_copy, "train", "Case3003", "Case3003_gd.nii.gz")
    _rewrite(path, lambda im: sitk.ChangeLabel(im, {500: 700}))
    _expect_failure(convert_myops, myops_copy, str(tmp_path / "raw"), r"Case3003_gd\.nii\.gz contains codes \[700\]")


def test_mmwhs_other_codes_stay_strict(mmwhs_source, tmp_path):
    source = str(tmp_path / "src")
    shutil.copytree(mmwhs_source, source)
    _rewrite(os.path.join(source, "ct_train_1003_label.nii.gz"), lambda im: sitk.ChangeLabel(im, {820: 822}))
    _expect_failure(convert_mmwhs, source, str(tmp_path / "raw"), r"ct_train_1003_label\.nii\.gz contains codes \[822\]")


@pytest.mark.parametrize("what,edit", [
    ("spacing", lambda im: (im.SetSpacing([s * 1.01 for s in im.GetSpacing()]), im)[1]),
    ("origin", lambda im: (im.SetOrigin([o + 1.0 for o in im.GetOrigin()]), im)[1]),
    ("direction", lambda im: (im.SetDirection(sitk.DICOMOrientImageFilter().GetDirectionCosinesFromOrientation(
        "RAS")), im)[1]),
    ("size", lambda im: im[:-2, :, :]),
])
def test_image_and_label_on_different_grids(myops_copy, tmp_path, what, edit):
    label = os.path.join(myops_copy, "train", "Case3005", "Case3005_gd.nii.gz")
    _rewrite(label, edit)
    _expect_failure(convert_myops, myops_copy, str(tmp_path / "raw"),
                    rf"Case3005_C0\.nii\.gz and label .*Case3005_gd\.nii\.gz .*{what}")


def test_tiny_header_differences_are_tolerated(myops_copy, tmp_path):
    label = os.path.join(myops_copy, "train", "Case3005", "Case3005_gd.nii.gz")
    _rewrite(label, lambda im: (im.SetOrigin([o * (1 + 1e-6) for o in im.GetOrigin()]), im)[1])
    folder = _convert_isolated(convert_myops, myops_copy, 31, str(tmp_path / "raw"))
    # the written label takes the image's exact header
    image = sitk.ReadImage(os.path.join(folder, "imagesTr", "Case3005_C0_0000.nii.gz"))
    assert sitk.ReadImage(os.path.join(folder, "labelsTr", "Case3005_C0.nii.gz")).GetOrigin() == image.GetOrigin()


def test_patient_in_two_folders(myops_copy, tmp_path):
    os.makedirs(os.path.join(myops_copy, "more", "Case3002"))
    copy = os.path.join(myops_copy, "more", "Case3002", "Case3002_C0.nii.gz")
    shutil.copyfile(os.path.join(myops_copy, "train", "Case3002", "Case3002_C0.nii.gz"), copy)
    _expect_failure(convert_myops, myops_copy, str(tmp_path / "raw"), r"Case3002.*found twice.*more/Case3002")


def test_mscmrseg_patient_in_two_folders(mscmrseg_source, tmp_path):
    source = str(tmp_path / "src")
    shutil.copytree(mscmrseg_source, source)
    os.makedirs(os.path.join(source, "copy"))
    shutil.copyfile(os.path.join(source, "labels", "patient2_LGE_manual.nii.gz"),
                    os.path.join(source, "copy", "patient2_LGE_manual.nii.gz"))
    _expect_failure(convert_mscmrseg, source, str(tmp_path / "raw"), r"label of patient 2, LGE found twice")


def test_empty_input(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("nothing to see")
    for convert in (convert_mscmrseg, convert_mmwhs, convert_myops):
        _expect_failure(convert, str(empty), str(tmp_path / "raw"), "no image of the modalities")
    with pytest.raises(ConversionError, match="does not exist"):
        convert_myops(str(tmp_path / "missing"), 30, str(tmp_path / "raw"))
    assert_nothing_written(str(tmp_path / "raw"))


def test_modality_with_no_labelled_image(mscmrseg_source, tmp_path):
    source = str(tmp_path / "src")
    shutil.copytree(mscmrseg_source, source)
    for name in os.listdir(os.path.join(source, "labels")):
        if "_T2_" in name:
            os.remove(os.path.join(source, "labels", name))
    _expect_failure(convert_mscmrseg, source, str(tmp_path / "raw"), "no labelled T2 image",
                    modalities=["C0", "T2"])


def test_existing_dataset_and_overwrite(myops_source, myops_copy, tmp_path):
    raw = tmp_path / "raw"
    old = raw / "Dataset030_Old"
    old.mkdir(parents=True)
    (old / "marker").write_text("old")
    before = snapshot(str(raw))
    with pytest.raises(ConversionError, match=r"Dataset030_Old.*--overwrite"):
        convert_myops(myops_source, 30, str(raw))
    assert snapshot(str(raw)) == before
    # a failed overwrite keeps the old dataset
    with open(os.path.join(myops_copy, "train", "Case3002", "Case3002_gd.nii.gz"), "wb") as f:
        f.write(b"\x1f\x8b broken gzip")
    with pytest.raises(ConversionError, match="Case3002_gd"):
        _convert_isolated(convert_myops, myops_copy, 30, str(raw), overwrite=True)
    assert snapshot(str(raw)) == before
    # a successful one replaces it, whatever its name
    folder = _convert_isolated(convert_myops, myops_source, 30, str(raw), overwrite=True)
    assert sorted(os.listdir(raw)) == ["Dataset030_MyoPS2020"] and folder == str(raw / "Dataset030_MyoPS2020")
    assert load_json(os.path.join(folder, "dataset.json"))["numTraining"] == 10


def test_a_file_where_a_folder_belongs_is_named_before_anything_is_read(myops_source, tmp_path):
    plain = tmp_path / "raw_is_a_file"
    plain.write_text("mine")
    for output_root in (plain, plain / "below"):
        with pytest.raises(ConversionError, match=r"raw_is_a_file is a file, not a folder, so the output folder"):
            _convert_isolated(convert_myops, myops_source, 30, str(output_root))
    assert plain.read_text() == "mine"
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "Dataset030_MyoPS2020").write_text("")
    for overwrite in (False, True):
        with pytest.raises(ConversionError, match=r"Dataset030_MyoPS2020 exists and is not a folder: remove or rename"):
            convert_myops(myops_source, 30, str(raw), overwrite=overwrite)
        assert os.listdir(raw) == ["Dataset030_MyoPS2020"]


def test_an_unwritable_output_is_one_clear_error(myops_source, tmp_path, monkeypatch):
    # the tests run as root, for whom every folder is writable: the checks' answers are stood in for
    raw = tmp_path / "raw"
    raw.mkdir()
    monkeypatch.setattr(common.os, "access", lambda path, mode: False)
    _expect_failure(convert_myops, myops_source, str(raw), rf"cannot write into {re.escape(str(raw))}: choose a")
    monkeypatch.undo()

    def read_only(path, *args, **kwargs):
        raise OSError(30, "Read-only file system", path)
    monkeypatch.setattr(common.os, "makedirs", read_only)
    with pytest.raises(ConversionError, match=r"cannot create the output folder .*new \(Read-only file system\)"):
        _convert_isolated(convert_myops, myops_source, 30, str(raw / "new"), split="80-20")


def test_overwrite_warns_when_the_preprocessed_copy_is_of_the_replaced_dataset(myops_source, tmp_path):
    raw, preprocessed = tmp_path / "raw", tmp_path / "pre"
    _convert_isolated(convert_myops, myops_source, 30, str(raw), preprocessed_root=str(preprocessed))
    stale = preprocessed / "Dataset030_MyoPS2020" / "dataset.json"
    shutil.copyfile(raw / "Dataset030_MyoPS2020" / "dataset.json", stale)  # what nnUNetv2_preprocess copies
    # the same dataset again: its preprocessed copy still agrees, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConversionWarning)
        convert_myops(myops_source, 30, str(raw), preprocessed_root=str(preprocessed), overwrite=True)
    with pytest.warns(ConversionWarning, match=r"pre/Dataset030_MyoPS2020/dataset.json is nnU-Net's preprocessed "
                                               r"copy of an earlier conversion and differs .* in labels; .*"
                                               r"nnUNetv2_plan_and_preprocess -d 30 again"):
        convert_myops(myops_source, 30, str(raw), preprocessed_root=str(preprocessed), overwrite=True,
                      keep_pathology=True)


def test_output_root_created_only_on_success(myops_copy, tmp_path):
    os.remove(os.path.join(myops_copy, "train", "Case3003", "Case3003_C0.nii.gz"))
    _rewrite(os.path.join(myops_copy, "train", "Case3003", "Case3003_gd.nii.gz"),
             lambda im: sitk.ChangeLabel(im, {600: 601}))
    with pytest.raises(ConversionError, match="601"):
        # 80-20: with one C0 image gone, 5 folds could not all validate C0 (refused before reading)
        convert_myops(myops_copy, 30, str(tmp_path / "new" / "raw"), split="80-20")
    assert not (tmp_path / "new").exists()


def test_class_missing_from_every_label_warns(myops_copy, tmp_path):
    for case in [c for c in os.listdir(os.path.join(myops_copy, "train")) if c.startswith("Case")]:
        _rewrite(os.path.join(myops_copy, "train", case, f"{case}_gd.nii.gz"),
                 lambda im: sitk.ChangeLabel(im, {600: 0}))
    with pytest.warns(ConversionWarning, match=r"\['right_ventricle'\] appear in no label"):
        folder = convert_myops(myops_copy, 32, str(tmp_path / "raw"))
    assert os.path.isdir(folder)


def test_too_few_patients_for_five_folds(myops_source, tmp_path):
    source = str(tmp_path / "src")
    os.makedirs(os.path.join(source, "train"))
    for case in ("Case3001", "Case3002"):
        shutil.copytree(os.path.join(myops_source, "train", case), os.path.join(source, "train", case))
    _expect_failure(convert_myops, source, str(tmp_path / "raw"), "5-fold split needs at least 5 patients")
    folder = _convert_isolated(convert_myops, source, 33, str(tmp_path / "raw"), split="80-20")
    assert len(load_json(os.path.join(folder, "splits_final.json"))) == 1


def test_nan_intensities_are_an_error_naming_the_file(myops_copy, tmp_path):
    import nibabel  # SimpleITK reads NaN and Inf of a NIfTI file as 0: write and check with nibabel

    path = os.path.join(myops_copy, "train", "Case3002", "Case3002_C0.nii.gz")
    image = nibabel.load(path)
    array = np.asarray(image.dataobj, dtype=np.float32)
    array[:3, 0, 0] = [np.nan, np.inf, -np.inf]
    header = image.header.copy()
    header.set_data_dtype(np.float32)
    nibabel.save(nibabel.Nifti1Image(array, image.affine, header), path)
    _expect_failure(convert_myops, myops_copy, str(tmp_path / "raw"), r"Case3002_C0\.nii\.gz holds 3 NaN/Inf voxel")


@pytest.mark.parametrize("ending", [".nii.gz", ".NII.GZ"])
def test_nan_intensities_are_an_error_whatever_the_names_case(myops_copy, tmp_path, ending):
    import nibabel

    path = os.path.join(myops_copy, "train", "Case3002", "Case3002_C0.nii.gz")
    image = nibabel.load(path)
    array = np.asarray(image.dataobj, dtype=np.float32)
    array[0, 0, :2] = np.nan
    header = image.header.copy()
    header.set_data_dtype(np.float32)
    nibabel.save(nibabel.Nifti1Image(array, image.affine, header), path)
    os.rename(path, path[:-len(".nii.gz")] + ending)
    _expect_failure(convert_myops, myops_copy, str(tmp_path / "raw"),
                    rf"Case3002_C0{re.escape(ending)} holds 2 NaN/Inf voxel")


@pytest.mark.parametrize("crop", [None, (32, 32)])
def test_an_empty_label_is_named_and_never_called_too_large(myops_copy, tmp_path, crop):
    _rewrite(os.path.join(myops_copy, "train", "Case3003", "Case3003_gd.nii.gz"), lambda im: im * 0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        convert_myops(myops_copy, 31, str(tmp_path / "raw"), crop=crop, split="80-20")
    messages = [str(w.message) for w in caught if issubclass(w.category, ConversionWarning)]
    assert any("Case3003_gd.nii.gz holds no foreground at all" in m for m in messages), messages
    assert not any("larger than the crop" in m for m in messages), messages


def test_near_miss_file_names_are_listed_not_skipped_silently(myops_copy, tmp_path):
    case = os.path.join(myops_copy, "train", "Case3002")
    shutil.copy(os.path.join(case, "Case3002_C0.nii.gz"), os.path.join(case, "Case3002_C0 (1).nii.gz"))
    shutil.copy(os.path.join(case, "Case3002_C0.nii.gz"), os.path.join(case, "Case3002_T2.nii.gz "))
    os.makedirs(os.path.join(myops_copy, "train", "Case3009_LGE.nii.gz"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        convert_myops(myops_copy, 32, str(tmp_path / "raw"), split="80-20")
    skipped = [str(w.message) for w in caught if "were skipped" in str(w.message)]
    assert len(skipped) == 1 and skipped[0].startswith("3 image-like name(s)")
    for name in ("Case3002_C0 (1).nii.gz", "Case3002_T2.nii.gz ", "Case3009_LGE.nii.gz' (a folder)"):
        assert name in skipped[0], name


def test_files_of_formats_the_converter_does_not_read_are_named(myops_copy, tmp_path):
    case = os.path.join(myops_copy, "train", "Case3002")
    for name in ("Case3002_T2.mha", "Case3002_C0.nrrd", "Case3002_notes.txt"):
        with open(os.path.join(case, name), "wb") as f:
            f.write(b"not read")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        convert_myops(myops_copy, 35, str(tmp_path / "raw"), split="80-20")
    skipped = [str(w.message) for w in caught if "were skipped" in str(w.message)]
    assert len(skipped) == 1 and skipped[0].startswith("2 image-like name(s)"), skipped
    assert "Case3002_T2.mha" in skipped[0] and "Case3002_C0.nrrd" in skipped[0]
    assert "notes.txt" not in skipped[0]  # not an image: no noise about it


@pytest.mark.parametrize("name", ["../escaped", "a/b", "", ".hidden", "two words", "a" * 101, "é"])
def test_a_dataset_name_that_is_no_plain_folder_name_is_refused_naming_the_limit(name):
    with pytest.raises(ConversionError, match=r"must be 1 to 100 letters, digits, '_' or '-'.*choose another --name"):
        dataset_folder_name(501, name)


@pytest.mark.parametrize("name", ["a" * 100, "My-Data_2", "7T"])
def test_plain_dataset_names_become_the_folder_name(name):
    assert dataset_folder_name(501, name) == f"Dataset501_{name}"


def test_a_dataset_id_being_converted_is_claimed(myops_copy, tmp_path):
    # another conversion of the id holds its claim (here: this test, as a second process would): a
    # conversion with another --name stops at once (_expect_failure converts id 30), instead of leaving a
    # second Dataset030_* folder
    raw = str(tmp_path / "raw")
    with claim_dataset_id(os.path.abspath(raw), 30):
        _expect_failure(convert_myops, myops_copy, raw, r"another conversion of dataset id 30 into .* is running",
                        name="OtherName", split="80-20")
        with warnings.catch_warnings():  # another id is not held
            warnings.simplefilter("ignore", ConversionWarning)
            convert_myops(myops_copy, 37, raw, split="80-20")
    with warnings.catch_warnings():  # the claim ends with its holder
        warnings.simplefilter("ignore", ConversionWarning)
        convert_myops(myops_copy, 30, raw, name="OtherName", split="80-20")
    assert sorted(os.listdir(raw)) == ["Dataset030_OtherName", "Dataset037_MyoPS2020"]


def test_a_preprocessed_folder_that_does_not_exist_is_named_when_created(myops_copy, tmp_path):
    (tmp_path / "nnUNet_preprocessed").mkdir()
    for root in (tmp_path / "nnUNet_preprocesed", tmp_path / "nnUNet_preprocessed"):  # a typo, then the real one
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            convert_myops(myops_copy, 38, str(tmp_path / "raw"), split="80-20", preprocessed_root=str(root),
                          overwrite=True)
        named = [str(w.message) for w in caught if "did not exist and is created" in str(w.message)]
        assert named == ([f"the preprocessed folder {root} (nnUNet_preprocessed) did not exist and is created for "
                          f"the split; if the variable holds a typo, correct it and convert again"]
                         if root.name == "nnUNet_preprocesed" else [])


def test_sigterm_leaves_no_hidden_partial_dataset(tmp_path):
    # the signal arrives as soon as the temporary folder appears, which is also the moment
    # right after its creation, before the conversion holds its name
    import signal
    import subprocess
    import sys
    import time

    source = tmp_path / "src"
    write_myops_phantom(str(source / "train"), n_patients=30, in_plane_size=96)
    raw = tmp_path / "raw"
    raw.mkdir()
    command = [os.path.join(os.path.dirname(sys.executable), "nnUNetv2_csa_convert_myops"), "-i", str(source),
               "-o", str(raw), "-d", "40", "--crop", "64", "64", "--split", "80-20", "-np", "1"]
    env = {k: v for k, v in os.environ.items() if k not in NNUNET_VARIABLES}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not any(p.startswith(".Dataset040") for p in os.listdir(raw)):
        assert process.poll() is None, "the conversion ended before it could be interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM
    assert os.listdir(raw) == []

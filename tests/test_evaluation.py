"""Tests of nnunetv2_csa.tools.evaluation against hand-computed values, a brute-force surface
distance in numpy/scipy, and scipy's Wilcoxon test."""
from __future__ import annotations

import json
import math
import os
import re
import tempfile

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from hypothesis import HealthCheck, assume, given, settings, strategies as st
from hypothesis.extra import numpy as hnp
from scipy import ndimage, stats
from scipy.spatial.distance import cdist

from nnunetv2_csa.image_files import IncompleteFileError
from nnunetv2_csa.tools.statistics import bootstrap_mean_ci
from nnunetv2_csa.tools.evaluation import (HD95_DEFINITIONS, evaluate_case, evaluate_folder, main, run_cli,
                                           summarize, symmetric_surface_distances, wilcoxon_between_methods)

# spacing in SimpleITK order (x, y, z); arrays below are in numpy order (z, y, x)
SPACING_2D = (0.5, 2.0, 5.0)
LABELS = {"background": 0, "myo": 1}


def write_label_map(path, array_zyx, spacing_xyz=SPACING_2D, origin=None, direction=None):
    image = sitk.GetImageFromArray(np.asarray(array_zyx, dtype=np.uint8))
    image.SetSpacing([float(s) for s in spacing_xyz])
    if origin is not None:
        image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection(direction)
    sitk.WriteImage(image, str(path))
    return str(path)


def square(x0, y0, size=4, shape=(1, 20, 20), value=1):
    array = np.zeros(shape, dtype=np.uint8)
    array[:, y0:y0 + size, x0:x0 + size] = value
    return array


def only_row(rows, class_name="myo"):
    [row] = [r for r in rows if r["class_name"] == class_name]
    return row


# ------------------------------------------------------------------ hand-computed cases

def test_squares_offset_along_fine_axis(tmp_path):
    # 4x4 squares, prediction shifted by 2 voxels along x (0.5 mm); single slice -> 2D surfaces.
    # Each 12-voxel ring: prediction -> reference distances are 4 x 0 (shared voxels), 4 x 0.5
    # (one x step), 4 x 1.0 (the far column, two x steps); by mirror symmetry the reverse
    # direction is the same. Pooled: 8 x 0, 8 x 0.5, 8 x 1.0 mm.
    reference = write_label_map(tmp_path / "ref.nii.gz", square(4, 4))
    prediction = write_label_map(tmp_path / "pred.nii.gz", square(6, 4))
    row = only_row(evaluate_case(prediction, reference, LABELS))
    assert row["case"] == "ref"
    assert row["label"] == 1
    assert row["dice"] == pytest.approx(0.5)  # overlap 2 x 4 of 16 + 16
    assert row["hd"] == pytest.approx(1.0)
    assert row["hd95"] == pytest.approx(1.0)
    assert row["assd"] == pytest.approx(12 / 24)
    assert (row["n_ref_voxels"], row["n_pred_voxels"], row["flag"]) == (16, 16, "none")


def test_isolated_voxels_make_hd95_interpolate(tmp_path):
    # prediction = reference square + two isolated voxels: (x=10, y=5) is 3 x-steps = 1.5 mm from
    # the reference ring, (x=4, y=10) is 3 y-steps = 6 mm from it. Pooled distances: 24 zeros
    # (both 12-voxel rings coincide), 1.5 and 6.0.
    # directed (default): prediction -> reference holds 12 zeros, 1.5 and 6.0: rank 0.95 * 13 = 12.35
    # -> 1.5 + 0.35 * (6.0 - 1.5) = 3.075; reference -> prediction is 12 zeros: 0. HD95 = max = 3.075.
    # pooled: the percentile of all 26 values at rank 0.95 * 25 = 23.75 -> 0 + 0.75 * (1.5 - 0) = 1.125.
    reference_array = square(4, 4)
    prediction_array = reference_array.copy()
    prediction_array[0, 5, 10] = 1
    prediction_array[0, 10, 4] = 1
    reference = write_label_map(tmp_path / "ref.nii.gz", reference_array)
    prediction = write_label_map(tmp_path / "pred.nii.gz", prediction_array)
    row = only_row(evaluate_case(prediction, reference, LABELS))
    assert row["dice"] == pytest.approx(32 / 34)
    assert row["hd"] == pytest.approx(6.0)
    assert row["hd95"] == pytest.approx(3.075)
    assert row["assd"] == pytest.approx(7.5 / 26)
    assert only_row(evaluate_case(prediction, reference, LABELS, hd95="pooled"))["hd95"] == pytest.approx(1.125)


def test_cubes_offset_along_thick_axis_3d(tmp_path):
    # 3x3x3 cubes (26 surface voxels each), prediction one slice (3 mm) further along z,
    # in-plane spacing 1 mm. Prediction -> reference: 16 voxels lie on the reference surface (0),
    # the prediction's face centre inside the reference is 1 mm from it, and its 9-voxel far face
    # is 3 mm away; the reverse direction is the mirror image. Pooled: 32 x 0, 2 x 1, 18 x 3.
    shape = (8, 10, 10)
    reference_array = np.zeros(shape, np.uint8)
    reference_array[2:5, 3:6, 3:6] = 1
    prediction_array = np.zeros(shape, np.uint8)
    prediction_array[3:6, 3:6, 3:6] = 1
    spacing = (1.0, 1.0, 3.0)
    reference = write_label_map(tmp_path / "ref.nii.gz", reference_array, spacing)
    prediction = write_label_map(tmp_path / "pred.nii.gz", prediction_array, spacing)
    row = only_row(evaluate_case(prediction, reference, LABELS))
    assert row["dice"] == pytest.approx(2 / 3)
    assert row["hd"] == pytest.approx(3.0)
    assert row["hd95"] == pytest.approx(3.0)
    assert row["assd"] == pytest.approx(56 / 52)


def test_identical_masks(tmp_path):
    array = square(3, 5, size=6)
    array[0, 6:8, 4:6] = 2
    labels = {"background": 0, "myo": 1, "lv": 2}
    reference = write_label_map(tmp_path / "ref.nii.gz", array)
    prediction = write_label_map(tmp_path / "pred.nii.gz", array)
    rows = evaluate_case(prediction, reference, labels)
    assert [r["class_name"] for r in rows] == ["myo", "lv"]
    for row in rows:
        assert (row["dice"], row["hd"], row["hd95"], row["assd"], row["flag"]) == (1.0, 0.0, 0.0, 0.0, "none")


def test_empty_conventions_and_flags(tmp_path):
    labels = {"background": 0, "myo": 1, "lv": 2, "rv": 3, "scar": 4}
    reference_array = square(2, 2, value=1)
    reference_array[0, 10:12, 10:12] = 2          # lv only in the reference
    prediction_array = square(2, 2, value=1)
    prediction_array[0, 15:17, 15:17] = 3         # rv only in the prediction; scar in neither
    reference = write_label_map(tmp_path / "ref.nii.gz", reference_array)
    prediction = write_label_map(tmp_path / "pred.nii.gz", prediction_array)
    rows = {r["class_name"]: r for r in evaluate_case(prediction, reference, labels)}
    diagonal = math.sqrt((20 * 0.5) ** 2 + (20 * 2.0) ** 2 + (1 * 5.0) ** 2)
    assert rows["myo"]["flag"] == "none"
    assert rows["lv"]["flag"] == "pred_empty"
    assert rows["rv"]["flag"] == "ref_empty"
    assert rows["scar"]["flag"] == "both_empty"
    for name in ("lv", "rv"):
        assert rows[name]["dice"] == 0.0
        for metric in ("hd", "hd95", "assd"):
            assert rows[name][metric] == pytest.approx(diagonal)
    assert (rows["lv"]["n_ref_voxels"], rows["lv"]["n_pred_voxels"]) == (4, 0)
    assert (rows["rv"]["n_ref_voxels"], rows["rv"]["n_pred_voxels"]) == (0, 4)
    assert [rows["scar"][k] for k in ("dice", "hd", "hd95", "assd")] == [1.0, 0.0, 0.0, 0.0]


def test_single_slice_3d_equals_2d_image(tmp_path):
    # an axis of length 1 is not padded: a one-slice volume is evaluated as a 2D image
    reference_array = square(4, 4)
    prediction_array = square(5, 3, size=5)
    results = []
    for dims, ref, pred in (("3d", reference_array, prediction_array),
                            ("2d", reference_array[0], prediction_array[0])):
        spacing = SPACING_2D if dims == "3d" else SPACING_2D[:2]
        r = write_label_map(tmp_path / f"ref{dims}.nii.gz", ref, spacing)
        p = write_label_map(tmp_path / f"pred{dims}.nii.gz", pred, spacing)
        results.append(only_row(evaluate_case(p, r, LABELS)))
    for metric in ("dice", "hd", "hd95", "assd"):
        assert results[0][metric] == pytest.approx(results[1][metric])
    assert results[0]["hd"] > 0


# ------------------------------------------------------------------ brute force

def brute_force_directed(mask_from, mask_to, spacing_zyx):
    """Distances (mm) from every surface voxel of mask_from to the nearest surface voxel of mask_to;
    surfaces by scipy erosion with face connectivity, the image border counting as background."""
    def surface_coordinates(mask):
        structure = ndimage.generate_binary_structure(mask.ndim, 1)
        surface = mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)
        return np.argwhere(surface) * np.asarray(spacing_zyx)
    return cdist(surface_coordinates(mask_from), surface_coordinates(mask_to)).min(axis=1)


@st.composite
def mask_pairs(draw):
    shape = draw(st.tuples(st.integers(2, 5), st.integers(3, 8), st.integers(3, 8)))
    spacing_zyx = draw(st.tuples(*[st.sampled_from([0.5, 0.8, 1.0, 1.7, 3.0])] * 3))
    masks = [draw(hnp.arrays(np.bool_, shape, elements=st.booleans())) for _ in range(2)]
    # also cover compact shapes, not only salt-and-pepper
    if draw(st.booleans()):
        masks = [ndimage.binary_closing(m, border_value=0) | m for m in masks]
    # empty margins: the evaluation crops to the masks' bounding box; distances must not change
    margins = draw(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3)), min_size=3, max_size=3))
    masks = [np.pad(m, margins) for m in masks]
    return masks[0], masks[1], spacing_zyx


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mask_pairs())
def test_surface_distances_match_brute_force(pair):
    prediction, reference, spacing_zyx = pair
    assume(prediction.any() and reference.any())
    pred_to_ref, ref_to_pred = symmetric_surface_distances(prediction, reference, spacing_zyx)
    expected_pred_to_ref = brute_force_directed(prediction, reference, spacing_zyx)
    expected_ref_to_pred = brute_force_directed(reference, prediction, spacing_zyx)
    np.testing.assert_allclose(np.sort(pred_to_ref), np.sort(expected_pred_to_ref), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.sort(ref_to_pred), np.sort(expected_ref_to_pred), rtol=1e-5, atol=1e-5)

    # and through files and evaluate_case
    with tempfile.TemporaryDirectory() as folder:
        spacing_xyz = tuple(reversed(spacing_zyx))
        p = write_label_map(os.path.join(folder, "case.nii.gz"), prediction, spacing_xyz)
        r = write_label_map(os.path.join(folder, "ref.nii.gz"), reference, spacing_xyz)
        row = only_row(evaluate_case(p, r, LABELS))
    pooled = np.concatenate([expected_pred_to_ref, expected_ref_to_pred])
    assert row["hd"] == pytest.approx(pooled.max(), rel=1e-5, abs=1e-5)
    directed = max(np.percentile(expected_pred_to_ref, 95), np.percentile(expected_ref_to_pred, 95))
    assert row["hd95"] == pytest.approx(directed, rel=1e-5, abs=1e-5)
    assert row["assd"] == pytest.approx(pooled.mean(), rel=1e-5, abs=1e-5)
    assert row["dice"] == pytest.approx(2 * (prediction & reference).sum() / (prediction.sum() + reference.sum()))


# ------------------------------------------------------------------ bad input

@pytest.mark.parametrize("change", ["spacing", "origin", "size", "direction"])
def test_geometry_mismatch_names_both_files(tmp_path, change):
    reference = write_label_map(tmp_path / "ref.nii.gz", square(4, 4))
    kwargs = dict(spacing_xyz=SPACING_2D)
    array = square(4, 4)
    if change == "spacing":
        kwargs["spacing_xyz"] = (0.5, 2.1, 5.0)
    elif change == "origin":
        kwargs["origin"] = (0.0, 1.0, 0.0)
    elif change == "size":
        array = square(4, 4, shape=(1, 20, 21))
    else:
        kwargs["direction"] = (0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)
    prediction = write_label_map(tmp_path / "pred.nii.gz", array, **kwargs)
    with pytest.raises(ValueError, match="do not share a geometry") as error:
        evaluate_case(prediction, reference, LABELS)
    assert prediction in str(error.value) and reference in str(error.value)
    assert change in str(error.value)


def test_geometry_within_tolerance_is_accepted(tmp_path):
    reference = write_label_map(tmp_path / "ref.nii.gz", square(4, 4))
    prediction = write_label_map(tmp_path / "pred.nii.gz", square(4, 4), (0.5 * (1 + 1e-6), 2.0, 5.0),
                                 origin=(1e-5, 0.0, 0.0))
    assert only_row(evaluate_case(prediction, reference, LABELS))["dice"] == 1.0


def test_unknown_label_value_is_an_error(tmp_path):
    reference = write_label_map(tmp_path / "ref.nii.gz", square(4, 4, value=200))
    prediction = write_label_map(tmp_path / "pred.nii.gz", square(4, 4))
    with pytest.raises(ValueError, match=r"ref\.nii\.gz holds label values \[200\]"):
        evaluate_case(prediction, reference, LABELS)


def _truncate(path):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) * 2 // 3])


@pytest.mark.parametrize("role", ["reference", "prediction"])
def test_truncated_file_is_an_error_not_a_score(tmp_path, role):
    # SimpleITK would read the missing voxels as zeros and the case would be scored wrong
    big = np.zeros((4, 64, 64), dtype=np.uint8)
    big[:, 10:40, 12:44] = 1
    reference = write_label_map(tmp_path / "ref.nii.gz", big)
    prediction = write_label_map(tmp_path / "pred.nii.gz", big)
    _truncate(reference if role == "reference" else prediction)
    name = "ref" if role == "reference" else "pred"
    with pytest.raises(IncompleteFileError, match=rf"{name}\.nii\.gz is (truncated|corrupt)"):
        evaluate_case(prediction, reference, LABELS)


def test_cli_reports_a_truncated_reference_in_one_line_and_fails(tmp_path, capsys):
    pred, ref = make_folders(tmp_path, ["p1_LGE", "p2_LGE"], ["p1_LGE", "p2_LGE"])
    big = np.zeros((4, 64, 64), dtype=np.uint8)
    big[:, 10:40, 12:44] = 1
    write_label_map(os.path.join(ref, "p2_LGE.nii.gz"), big)
    write_label_map(os.path.join(pred, "p2_LGE.nii.gz"), big)
    _truncate(os.path.join(ref, "p2_LGE.nii.gz"))
    with pytest.raises(SystemExit) as exit_info:
        main(["-pred", pred, "-ref", ref, "-l", "myo=1", "-o", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    # one line (after the interrupted progress bar), no traceback
    assert re.search(r"(^|[\r\n])error: [^\n]*p2_LGE\.nii\.gz is[^\n]*\n$", err) and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_region_labels_are_rejected(tmp_path):
    reference = write_label_map(tmp_path / "ref.nii.gz", square(4, 4))
    with pytest.raises(ValueError, match="region"):
        evaluate_case(reference, reference, {"background": 0, "heart": [1, 2]})


def make_folders(tmp_path, reference_cases, prediction_cases):
    reference_folder, prediction_folder = tmp_path / "ref", tmp_path / "pred"
    reference_folder.mkdir()
    prediction_folder.mkdir()
    for i, case in enumerate(reference_cases):
        write_label_map(reference_folder / f"{case}.nii.gz", square(4, 4))
    for i, case in enumerate(prediction_cases):
        write_label_map(prediction_folder / f"{case}.nii.gz", square(4 + i % 3, 4))
    (prediction_folder / "summary.json").write_text("{}")  # nnU-Net's own files are not cases
    return str(prediction_folder), str(reference_folder)


def test_image_files_the_evaluation_does_not_read_are_named(tmp_path):
    pred, ref = make_folders(tmp_path, ["p1_LGE", "p2_LGE"], ["p1_LGE", "p2_LGE"])
    for name in ("p3_LGE.mha", "p4_LGE.NII.GZ", "p5_LGE.nrrd"):
        with open(os.path.join(pred, name), "wb") as f:
            f.write(b"not read")
    with pytest.warns(UserWarning) as caught:
        df = evaluate_folder(pred, ref, LABELS, output_folder=str(tmp_path / "out"))
    skipped = [str(w.message) for w in caught if "were not evaluated" in str(w.message)]
    assert len(skipped) == 1 and skipped[0].startswith("3 image file(s) in the prediction folder"), skipped
    for name in ("p3_LGE.mha", "p4_LGE.NII.GZ", "p5_LGE.nrrd"):
        assert name in skipped[0]
    assert "summary.json" not in skipped[0]  # nnU-Net's own files are no images
    assert sorted(df["case"].unique()) == ["p1_LGE", "p2_LGE"]


def test_missing_prediction_is_an_error_listing_cases(tmp_path):
    pred, ref = make_folders(tmp_path, ["p1_LGE", "p2_LGE", "p3_LGE"], ["p1_LGE", "p3_LGE"])
    with pytest.raises(FileNotFoundError, match=r"have no prediction.*\['p2_LGE'\].*allow_missing"):
        evaluate_folder(pred, ref, LABELS)


def test_the_cases_given_are_scored_and_no_other(tmp_path):
    # a cross-validation of some folds predicts their validation cases only (the instructions command)
    pred, ref = make_folders(tmp_path, ["p1_LGE", "p2_LGE", "p3_LGE"], ["p1_LGE", "p3_LGE"])
    df = evaluate_folder(pred, ref, LABELS, cases=["p1_LGE", "p3_LGE"])
    assert sorted(df["case"].unique()) == ["p1_LGE", "p3_LGE"]
    with pytest.raises(FileNotFoundError, match=r"have no prediction.*\['p2_LGE'\]"):
        evaluate_folder(pred, ref, LABELS, cases=["p1_LGE", "p2_LGE"])
    with pytest.raises(FileNotFoundError, match=r"1 case\(s\) to score have no reference .*: p7_LGE"):
        evaluate_folder(pred, ref, LABELS, cases=["p1_LGE", "p7_LGE"])


def test_allow_missing_evaluates_the_common_cases_and_reports_skipped(tmp_path):
    pred, ref = make_folders(tmp_path, ["p1_LGE", "p2_LGE", "p3_LGE"], ["p1_LGE", "p3_LGE", "p9_LGE"])
    with pytest.warns(UserWarning, match="p2_LGE"):
        df = evaluate_folder(pred, ref, LABELS, allow_missing=True, output_folder=str(tmp_path / "out"))
    assert sorted(df["case"]) == ["p1_LGE", "p3_LGE"]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["skipped"] == {"missing_prediction": ["p2_LGE"], "missing_reference": ["p9_LGE"]}


def test_case_missing_from_modality_map_is_an_error(tmp_path):
    pred, ref = make_folders(tmp_path, ["p1_LGE", "p1_C0"], ["p1_LGE", "p1_C0"])
    with pytest.raises(ValueError, match=r"no modality.*\['p1_C0'\]"):
        evaluate_folder(pred, ref, LABELS, case_modality={"p1_LGE": "LGE"})


# ------------------------------------------------------------------ folder and summary.json

def tagged_folders(tmp_path):
    cases = ["p1_LGE", "p2_LGE", "p1_C0", "p2_C0", "p3_C0"]
    labels = {"background": 0, "myo": 1, "lv": 2}
    reference_folder, prediction_folder = tmp_path / "ref", tmp_path / "pred"
    reference_folder.mkdir()
    prediction_folder.mkdir()
    for i, case in enumerate(cases):
        reference = square(4, 4)
        reference[0, 12:15, 12:15] = 2
        prediction = square(4 + i % 2, 4)
        if case != "p2_LGE":                      # one lv left out of a prediction
            prediction[0, 12:15, 12:15] = 2
        write_label_map(reference_folder / f"{case}.nii.gz", reference)
        write_label_map(prediction_folder / f"{case}.nii.gz", prediction)
    case_modality = {c: c.split("_")[1] for c in cases}
    case_patient = {c: c.split("_")[0] for c in cases}
    return str(prediction_folder), str(reference_folder), labels, case_modality, case_patient


def test_evaluate_folder_rows_and_summary_json(tmp_path):
    pred, ref, labels, case_modality, case_patient = tagged_folders(tmp_path)
    out = tmp_path / "out"
    df = evaluate_folder(pred, ref, labels, case_modality=case_modality, case_patient=case_patient,
                         output_folder=str(out))
    assert len(df) == 5 * 2
    assert {"case", "modality", "patient", "class_name", "label", "dice", "hd", "hd95", "assd",
            "n_ref_voxels", "n_pred_voxels", "flag"} <= set(df.columns)
    assert df.loc[df["case"] == "p1_LGE", "modality"].unique().tolist() == ["LGE"]

    csv = pd.read_csv(out / "metrics.csv")
    assert len(csv) == 10 and csv["dice"].tolist() == pytest.approx(df["dice"].tolist())

    with open(out / "summary.json") as f:
        summary = json.load(f, parse_constant=lambda c: pytest.fail(f"summary.json holds {c}"))
    assert len(summary["metric_per_case"]) == 5
    entry = next(e for e in summary["metric_per_case"] if e["case"] == "p2_LGE")
    assert entry["modality"] == "LGE" and entry["patient"] == "p2"
    assert entry["reference_file"].endswith("p2_LGE.nii.gz")
    assert entry["metrics"]["lv"]["flag"] == "pred_empty"
    assert set(summary["mean"]) == {"myo", "lv"}
    assert summary["definitions"]["hd95"].startswith("max of the two directed 95th percentiles")
    assert summary["absent_classes"] == []
    assert summary["mean"]["myo"]["dice"] == pytest.approx(df.loc[df.class_name == "myo", "dice"].mean())
    assert set(summary["per_modality"]) == {"LGE", "C0"}
    lge_myo_dice = summary["per_modality"]["LGE"]["myo"]["dice"]
    lge_values = df.loc[(df.modality == "LGE") & (df.class_name == "myo"), "dice"]
    assert lge_myo_dice == pytest.approx({"mean": lge_values.mean(), "std": lge_values.std(),
                                          "median": lge_values.median(), "n": 2})
    lge_case_means = df[df.modality == "LGE"].groupby("case")["dice"].mean()
    assert summary["per_modality"]["LGE"]["mean_over_classes"]["dice"]["mean"] == pytest.approx(
        lge_case_means.mean())
    assert summary["flags"]["LGE"]["lv"] == {"both_empty": 0, "pred_empty": 1, "ref_empty": 0}
    assert summary["flags"]["C0"]["lv"] == {"both_empty": 0, "pred_empty": 0, "ref_empty": 0}


@pytest.mark.parametrize("hd95", ["directed", "pooled"])
def test_summary_json_states_the_hd95_definition_its_values_were_computed_with(tmp_path, hd95):
    # one table (HD95_DEFINITIONS) both chooses the computation and says what it is: summary.json once
    # said "pooled (MedPy)" beside directed values
    for folder in ("ref", "pred"):
        (tmp_path / folder).mkdir()
    ref = write_label_map(tmp_path / "ref" / "c1.nii.gz", square(2, 2, size=6))
    pred = write_label_map(tmp_path / "pred" / "c1.nii.gz", square(3, 2, size=9))
    evaluate_folder(str(tmp_path / "pred"), str(tmp_path / "ref"), LABELS, output_folder=str(tmp_path / "out"),
                    hd95=hd95)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["definitions"]["hd95"] == f"{HD95_DEFINITIONS[hd95]} (--hd95 {hd95})"
    assert "hd95_definition" not in summary  # no second statement that could disagree
    other = next(d for d in HD95_DEFINITIONS if d != hd95)
    assert HD95_DEFINITIONS[other] not in json.dumps(summary)
    [row] = evaluate_case(pred, ref, LABELS, hd95=hd95)
    [other_row] = evaluate_case(pred, ref, LABELS, hd95=other)
    assert other_row["hd95"] != pytest.approx(row["hd95"])  # the two definitions differ on this case
    assert summary["mean"]["myo"]["hd95"] == pytest.approx(row["hd95"])


def test_a_class_present_in_no_file_is_named_as_absent(tmp_path, capsys):
    pred, ref = make_folders(tmp_path, ["c1", "c2"], ["c1", "c2"])  # only label 1 is drawn
    run_cli(["-pred", pred, "-ref", ref, "-l", "myo=1", "scar=2", "-o", str(tmp_path / "out")])
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["absent_classes"] == ["scar"]
    assert summary["mean"]["scar"]["dice"] == 1.0  # the convention, now stated beside it
    assert "absent_classes" in summary["definitions"]
    assert "class(es) ['scar'] appear in no prediction and no reference" in capsys.readouterr().err


def test_parallel_workers_give_the_same_rows(tmp_path):
    pred, ref, labels, case_modality, _ = tagged_folders(tmp_path)
    serial = evaluate_folder(pred, ref, labels, case_modality=case_modality)
    parallel = evaluate_folder(pred, ref, labels, case_modality=case_modality, num_processes=2)
    pd.testing.assert_frame_equal(serial, parallel)


def test_summarize_without_modality_and_single_case_std():
    df = pd.DataFrame({"case": ["a", "a", "b", "b"], "class_name": ["myo", "lv"] * 2,
                       "dice": [0.5, 1.0, 0.7, 0.9], "hd": [1.0, 2.0, 3.0, 4.0],
                       "hd95": [1.0, 2.0, 3.0, 4.0], "assd": [0.1, 0.2, 0.3, 0.4]})
    table = summarize(df).set_index(["modality", "class_name", "metric"])
    assert table.loc[("all", "myo", "dice"), "mean"] == pytest.approx(0.6)
    assert table.loc[("all", "myo", "dice"), "std"] == pytest.approx(np.std([0.5, 0.7], ddof=1))
    assert table.loc[("all", "mean_over_classes", "dice"), "median"] == pytest.approx((0.75 + 0.8) / 2)
    assert table.loc[("all", "lv", "hd"), "n"] == 2
    one_case = summarize(df[df.case == "a"]).set_index(["modality", "class_name", "metric"])
    assert math.isnan(one_case.loc[("all", "myo", "dice"), "std"])


# ------------------------------------------------------------------ Wilcoxon

def method_table(values_by_case, modality_of_case, patient_of_case=None):
    rows = []
    for case, values in values_by_case.items():
        for class_name, value in zip(("myo", "lv"), values):
            row = dict(case=case, modality=modality_of_case[case], class_name=class_name, dice=value)
            if patient_of_case:
                row["patient"] = patient_of_case[case]
            rows.append(row)
    return pd.DataFrame(rows)


def test_wilcoxon_matches_scipy_on_case_means():
    modality = {f"p{i}_LGE": "LGE" for i in range(7)}
    rng = np.random.default_rng(0)
    a_values = {c: rng.uniform(0.6, 0.9, 2) for c in modality}
    b_values = {c: v - rng.uniform(-0.05, 0.1, 2) for c, v in a_values.items()}
    result = wilcoxon_between_methods(method_table(a_values, modality), method_table(b_values, modality))
    assert len(result) == 1
    row = result.iloc[0]
    a_means = np.array([a_values[c].mean() for c in sorted(modality)])
    b_means = np.array([b_values[c].mean() for c in sorted(modality)])
    expected = stats.wilcoxon(a_means, b_means)
    assert row["modality"] == "LGE" and row["n"] == 7 and row["n_unmatched"] == 0
    assert row["statistic"] == pytest.approx(expected.statistic)
    assert row["p_value"] == pytest.approx(expected.pvalue)
    assert row["mean_difference"] == pytest.approx((a_means - b_means).mean())
    # the bootstrap interval is of the same per-unit differences the test pairs
    assert (row["ci_low"], row["ci_high"]) == pytest.approx(bootstrap_mean_ci(a_means - b_means), rel=1e-6)
    assert row["reason"] == ""


def test_wilcoxon_pairs_on_patient_and_per_modality():
    cases = ["p1_a", "p1_b", "p2_a", "p2_b", "p3_a", "p4_a", "q1_a", "q2_a"]
    modality = {c: ("LGE" if c.startswith("p") else "C0") for c in cases}
    patient = {c: c.split("_")[0] for c in cases}
    a_values = {c: np.array([0.8, 0.6]) + 0.01 * i for i, c in enumerate(cases)}
    b_values = {c: np.array([0.7, 0.7]) - 0.02 * i ** 2 for i, c in enumerate(cases)}
    result = wilcoxon_between_methods(method_table(a_values, modality, patient),
                                      method_table(b_values, modality, patient), pair_on="patient")
    lge = result.set_index("modality").loc["LGE"]
    per_patient = {}
    for c in cases:
        if modality[c] == "LGE":
            per_patient.setdefault(patient[c], []).append((a_values[c].mean(), b_values[c].mean()))
    a_means = [np.mean([x for x, _ in v]) for _, v in sorted(per_patient.items())]
    b_means = [np.mean([y for _, y in v]) for _, v in sorted(per_patient.items())]
    assert lge["n"] == 4
    assert lge["p_value"] == pytest.approx(stats.wilcoxon(a_means, b_means).pvalue)
    assert set(result["modality"]) == {"LGE", "C0"}


def test_wilcoxon_degenerate_cases():
    modality = {"p1": "LGE", "p2": "LGE", "p3": "LGE", "q1": "C0"}
    values = {c: np.array([0.8, 0.7]) for c in modality}
    table = method_table(values, modality)
    result = wilcoxon_between_methods(table, table.copy()).set_index("modality")
    assert result.loc["LGE", "p_value"] == 1.0 and result.loc["LGE", "statistic"] == 0.0
    assert "all differences are zero" in result.loc["LGE", "reason"]
    assert result.loc["C0", "n"] == 1 and math.isnan(result.loc["C0", "p_value"])
    assert "fewer than 2" in result.loc["C0", "reason"]


def test_wilcoxon_counts_unmatched_rows_and_needs_columns():
    modality = {"p1": "LGE", "p2": "LGE", "p3": "LGE"}
    a = method_table({c: np.array([0.8, 0.7]) for c in modality}, modality)
    b = a[a.case != "p3"].assign(dice=lambda d: d.dice - 0.1)
    row = wilcoxon_between_methods(a, b).iloc[0]
    assert row["n"] == 2 and row["n_unmatched"] == 2
    with pytest.raises(ValueError, match="patient"):
        wilcoxon_between_methods(a, b, pair_on="patient")


# ------------------------------------------------------------------ command line

def test_cli_with_dataset_json_tags(tmp_path, capsys):
    pred, ref, labels, case_modality, case_patient = tagged_folders(tmp_path)
    dataset_json = tmp_path / "dataset.json"
    dataset_json.write_text(json.dumps({
        "labels": labels, "file_ending": ".nii.gz", "channel_names": {"0": "MRI"}, "numTraining": 5,
        "csa_modalities": ["LGE", "C0"], "csa_case_modality": case_modality, "csa_case_patient": case_patient}))
    out = tmp_path / "out"
    df = run_cli(["-pred", pred, "-ref", ref, "-djfile", str(dataset_json), "-o", str(out)])
    printed = capsys.readouterr().out
    assert "LGE" in printed and "C0" in printed and "hd95" in printed and "pred_empty" in printed
    assert set(df["modality"]) == {"LGE", "C0"} and "patient" in df
    assert (out / "metrics.csv").is_file() and (out / "summary.json").is_file()
    # the console script's entry point returns nothing, so a successful run exits 0
    assert main(["-pred", pred, "-ref", ref, "-djfile", str(dataset_json), "-o", str(tmp_path / "again")]) is None


def test_cli_with_label_list_and_default_output(tmp_path, capsys):
    pred, ref = make_folders(tmp_path, ["c1", "c2"], ["c1", "c2"])
    df = run_cli(["-pred", pred, "-ref", ref, "-l", "myo=1"])
    assert df["class_name"].tolist() == ["myo", "myo"] and "modality" not in df
    assert os.path.isfile(os.path.join(pred, "csa_evaluation", "summary.json"))
    assert json.loads(open(os.path.join(pred, "summary.json")).read()) == {}  # nnU-Net's file untouched
    assert "all" in capsys.readouterr().out


def test_prediction_folder_equal_to_reference_folder_is_refused(tmp_path):
    pred, ref = make_folders(tmp_path, ["c1"], ["c1"])
    for same in (ref, ref + "/", os.path.join(ref, "..", "ref")):  # one folder, however spelled
        with pytest.raises(ValueError, match="the prediction and the reference folder are both"):
            run_cli(["-pred", same, "-ref", ref, "-l", "1"])
    assert sorted(os.listdir(ref)) == ["c1.nii.gz"]  # nothing written among the references


@pytest.mark.parametrize("foreign", ["summary.json", "metrics.csv"])
def test_output_folder_with_files_the_evaluation_did_not_write_is_refused_before_scoring(tmp_path, foreign):
    pred, ref = make_folders(tmp_path, ["c1", "c2"], ["c1", "c2"])
    _truncate(os.path.join(ref, "c2.nii.gz"))  # scoring first would end in this file's error instead
    os.remove(os.path.join(pred, "summary.json"))  # make_folders' stand-in for nnU-Net's own
    (tmp_path / "pred" / foreign).write_text("{}")
    with pytest.raises(ValueError, match=rf"holds {foreign} that nnUNetv2_csa_evaluate did not write"):
        run_cli(["-pred", pred, "-ref", ref, "-l", "1", "-o", pred])
    assert (tmp_path / "pred" / foreign).read_text() == "{}"


def test_unwritable_or_file_output_fails_before_scoring(tmp_path):
    pred, ref = make_folders(tmp_path, ["c1", "c2"], ["c1", "c2"])
    _truncate(os.path.join(ref, "c2.nii.gz"))
    with pytest.raises(ValueError, match="cannot write into /proc"):  # no one may write there, root included
        run_cli(["-pred", pred, "-ref", ref, "-l", "1", "-o", "/proc/csa_evaluation"])
    with pytest.raises(ValueError, match=r"-o .*summary.json is a file; give a folder"):
        run_cli(["-pred", pred, "-ref", ref, "-l", "1", "-o", os.path.join(pred, "summary.json")])


def test_an_output_folder_the_evaluation_wrote_is_written_again(tmp_path):
    # the negative control of the refusals above
    pred, ref = make_folders(tmp_path, ["c1"], ["c1"])
    run_cli(["-pred", pred, "-ref", ref, "-l", "1", "-o", str(tmp_path / "out")])
    run_cli(["-pred", pred, "-ref", ref, "-l", "1", "-o", str(tmp_path / "out")])
    assert sorted(os.listdir(tmp_path / "out")) == ["metrics.csv", "summary.json"]


def test_an_evaluation_stopped_while_writing_leaves_no_half_file_and_runs_again(tmp_path, monkeypatch):
    pred, ref = make_folders(tmp_path, ["c1"], ["c1"])
    out = tmp_path / "out"

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C, or SIGTERM as the command turns it into SystemExit

    with monkeypatch.context() as patch:
        patch.setattr(pd.DataFrame, "to_csv", stopped)
        with pytest.raises(KeyboardInterrupt):
            evaluate_folder(pred, ref, LABELS, output_folder=str(out))
    assert os.listdir(out) == ["summary.json"]  # whole, and no temporary file beside it
    evaluate_folder(pred, ref, LABELS, output_folder=str(out))  # its own folder: written again
    assert sorted(os.listdir(out)) == ["metrics.csv", "summary.json"]


def test_cli_dataset_json_without_tags_evaluates_without_modality(tmp_path, capsys):
    pred, ref = make_folders(tmp_path, ["c1", "c2"], ["c1", "c2"])
    dataset_json = tmp_path / "dataset.json"
    dataset_json.write_text(json.dumps({"labels": LABELS, "file_ending": ".nii.gz"}))
    df = run_cli(["-pred", pred, "-ref", ref, "-djfile", str(dataset_json), "-o", str(tmp_path / "o")])
    assert "modality" not in df
    assert "no modality tags" in capsys.readouterr().err


def test_cli_missing_prediction_fails_unless_allowed(tmp_path):
    pred, ref = make_folders(tmp_path, ["c1", "c2"], ["c1"])
    with pytest.raises(FileNotFoundError, match="c2"):
        run_cli(["-pred", pred, "-ref", ref, "-l", "1", "-o", str(tmp_path / "o")])
    with pytest.warns(UserWarning):
        df = run_cli(["-pred", pred, "-ref", ref, "-l", "1", "-o", str(tmp_path / "o"), "--allow-missing"])
    assert df["case"].tolist() == ["c1"] and df["class_name"].tolist() == ["label_1"]


def _dataset_json(tmp_path, case_modality, other=None):
    dataset_json = {"labels": {"background": 0, "myo": 1, "lv": 2}, "file_ending": ".nii.gz",
                    "csa_modalities": ["LGE", "C0"], "csa_case_modality": case_modality,
                    "csa_case_patient": {c: c.split("_")[0] for c in case_modality}}
    if other:
        dataset_json["csa_other_modality_cases"] = other
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps(dataset_json))
    return str(path)


def test_cli_compares_the_references_of_the_predictions_modality_only(tmp_path, capsys):
    # the natural reference folder (labelsTr) holds both modalities; the predictions one
    pred, ref, _, case_modality, _ = tagged_folders(tmp_path)
    for case in ("p1_C0", "p2_C0", "p3_C0"):
        os.remove(os.path.join(pred, f"{case}.nii.gz"))
    main(["-pred", pred, "-ref", ref, "-djfile", _dataset_json(tmp_path, case_modality), "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert "comparing the ['LGE'] reference cases" in err and "3 reference case(s) of other modalities" in err
    metrics = pd.read_csv(tmp_path / "o" / "metrics.csv")
    assert sorted(metrics["case"].unique()) == ["p1_LGE", "p2_LGE"] and set(metrics["modality"]) == {"LGE"}


def test_cli_knows_the_cases_an_unpaired_conversion_left_out(tmp_path):
    pred, ref, _, case_modality, _ = tagged_folders(tmp_path)
    trained = {c: m for c, m in case_modality.items() if c != "p3_C0"}
    djfile = _dataset_json(tmp_path, trained, other={"p3_C0": {"modality": "C0", "patient": "p3"}})
    main(["-pred", pred, "-ref", ref, "-djfile", djfile, "-o", str(tmp_path / "o")])
    metrics = pd.read_csv(tmp_path / "o" / "metrics.csv")
    row = metrics[metrics["case"] == "p3_C0"].iloc[0]
    assert row["modality"] == "C0" and row["patient"] == "p3"


def test_grid_differences_one_rule_for_converters_and_evaluation():
    from nnunetv2_csa.image_files import grid_differences

    def grid(size=(8, 8, 4), spacing=(0.7, 0.7, 10.0), origin=(-200.0, 150.0, 30.0), direction=None):
        image = sitk.Image(size, sitk.sitkUInt8)
        image.SetSpacing(spacing)
        image.SetOrigin(origin)
        if direction is not None:
            image.SetDirection(direction)
        return image

    reference = grid()
    assert grid_differences(reference, grid()) == []
    # last-digit header noise passes: 1e-5 relative spacing, 0.01 mm at a 200 mm origin
    assert grid_differences(reference, grid(spacing=(0.700007, 0.7, 10.0), origin=(-200.01, 150.0, 30.0))) == []
    assert [d.split()[0] for d in grid_differences(reference, grid(spacing=(0.701, 0.7, 10.0)))] == ["spacing"]
    assert [d.split()[0] for d in grid_differences(reference, grid(origin=(-200.1, 150.0, 30.0)))] == ["origin"]
    tilted = (1.0, 0.0, 0.0, 0.0, 0.9999995, -0.001, 0.0, 0.001, 0.9999995)
    assert [d.split()[0] for d in grid_differences(reference, grid(direction=tilted))] == ["direction"]
    assert grid_differences(reference, grid(size=(8, 8, 5))) == ["size (8, 8, 4) vs (8, 8, 5)"]

"""nnUNetv2_csa_tag_modalities: modality tags for a dataset already in nnU-Net's raw format."""
import hashlib
import json
import os
import re
import shutil

import pytest

from conftest import nnunet_environment, run_command
from dataset_conversion.errors import ConversionError
from nnunetv2_csa.modality import ModalityTagError
from dataset_conversion.tag_modalities import patients_from_rule, tags_from_csv
from nnunetv2_csa.modality_rules import compile_rules, converter_naming_rules, modalities_from_rules

TAGGED_DATASET_ID = 994
#: the AMOS-style rules of documentation/converting.md: ids up to 500 are CT, above are MR
AMOS_RULES = [("CT", r"amos_0([0-4][0-9][0-9]|500)"), ("MR", r"amos_(050[1-9]|05[1-9][0-9]|0[6-9][0-9][0-9])")]
TAG_KEYS = ("csa_modalities", "csa_case_modality", "csa_case_patient")


def test_amos_style_rules_split_the_ids_at_500():
    cases = [f"amos_{i:04d}" for i in range(1, 1000)]
    assignment = modalities_from_rules(cases, compile_rules(AMOS_RULES))
    assert {c for c, m in assignment.items() if m == "CT"} == {f"amos_{i:04d}" for i in range(1, 501)}
    assert {c for c, m in assignment.items() if m == "MR"} == {f"amos_{i:04d}" for i in range(501, 1000)}


def test_rules_match_whole_names_and_refuse_unmatched_or_ambiguous_cases():
    rules = compile_rules([("LGE", r"p\d+_LGE"), ("C0", r"p\d+_C0"), ("any", r"p1_.*")])
    with pytest.raises(ModalityTagError, match=r"1 case\(s\) match no --modality: p2_LGE_x; 1 match two or more: "
                                              r"p1_C0 \(C0/any\)"):
        modalities_from_rules(["p2_LGE_x", "p1_C0", "p3_LGE"], rules)  # p2_LGE_x: a prefix match is not enough
    with pytest.raises(ModalityTagError, match="at least two modalities"):
        compile_rules([("CT", ".*")])
    with pytest.raises(ModalityTagError, match="given twice"):
        compile_rules([("CT", "a"), ("CT", "b")])
    with pytest.raises(ModalityTagError, match="not a regular expression"):
        compile_rules([("CT", "a("), ("MR", "b")])


def test_modality_names_that_would_be_paths_or_differ_only_in_case_are_refused():
    for name in ("../../escaped_LGE", "a/b", "", "..", "x" * 65):
        with pytest.raises(ModalityTagError, match="is not a plain name"):
            compile_rules([(name, "a.*"), ("MR", "b.*")])
    with pytest.raises(ModalityTagError, match="'lge' and 'LGE' in --modality differ only in case"):
        compile_rules([("lge", "a.*"), ("LGE", "b.*")])
    assert [name for name, _ in compile_rules([("x" * 64, "a.*"), ("MR", "b.*")])] == ["x" * 64, "MR"]


def test_converter_naming_rules_take_the_modality_suffix_whole():
    rules = converter_naming_rules(["LGE", "C0", "T2"])
    assert modalities_from_rules(["patient1_LGE", "p_2_C0", "a_T2"], rules) == \
        {"patient1_LGE": "LGE", "p_2_C0": "C0", "a_T2": "T2"}
    with pytest.raises(ModalityTagError, match="match no --modality: patient1_LGEx, LGE"):
        modalities_from_rules(["patient1_LGEx", "LGE"], rules)


def test_patient_rule_takes_its_first_group_and_needs_one():
    assert patients_from_rule(["patient7_LGE", "patient7_C0"], r"^(patient\d+)_") == \
        {"patient7_LGE": "patient7", "patient7_C0": "patient7"}
    assert patients_from_rule(["a", "b"], None) == {"a": "a", "b": "b"}
    with pytest.raises(ConversionError, match="has no group"):
        patients_from_rule(["a"], r"a")
    with pytest.raises(ConversionError, match="finds no patient in 1 case name"):
        patients_from_rule(["patient1_LGE", "x_C0"], r"^(patient\d+)_")


def test_csv_gives_modalities_in_order_of_first_appearance_and_must_list_every_case(tmp_path):
    table = tmp_path / "tags.csv"
    table.write_text("case,modality,patient\nb_mr,MR,p1\na_ct,CT,p1\nc_ct,CT,\n")
    modality, patient, order = tags_from_csv(str(table), ["a_ct", "b_mr", "c_ct"])
    assert order == ["MR", "CT"] and modality["a_ct"] == "CT" and patient == {"b_mr": "p1", "a_ct": "p1",
                                                                              "c_ct": "c_ct"}
    with pytest.raises(ConversionError, match=r"1 training case\(s\) are not in it: d_ct"):
        tags_from_csv(str(table), ["a_ct", "b_mr", "c_ct", "d_ct"])
    table.write_bytes("\ufeffcase,modality\na_ct,CT\nb_mr,MR\n".encode())  # Excel's UTF-8 CSV
    assert tags_from_csv(str(table), ["a_ct", "b_mr"])[0] == {"a_ct": "CT", "b_mr": "MR"}
    table.write_text("case,modality\na_ct,ct\nb_mr,CT\n")
    with pytest.raises(ModalityTagError, match="'ct' and 'CT' in .*tags.csv differ only in case"):
        tags_from_csv(str(table), ["a_ct", "b_mr"])
    table.write_text("name,modality\na_ct,CT\n")
    with pytest.raises(ModalityTagError, match="needs the columns case, modality"):
        tags_from_csv(str(table), ["a_ct"])


def _tree_digest(folder) -> str:
    digest = hashlib.sha256()
    for root, _, files in sorted(os.walk(folder)):
        for name in sorted(files):
            digest.update(name.encode())
            with open(os.path.join(root, name), "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()


@pytest.mark.parametrize("interruption", [KeyboardInterrupt(), SystemExit(143), OSError(28, "No space left")])
def test_tagging_stopped_before_the_tags_are_written_puts_the_old_split_back(tmp_path, monkeypatch, interruption):
    # the split is replaced first; stopped right after (SIGTERM unwinds as SystemExit), the new split
    # would stand beside the old tags
    from dataset_conversion import tag_modalities

    folder, preprocessed = tmp_path / "raw" / "Dataset905_X", tmp_path / "preprocessed" / "Dataset905_X"
    for place in (folder, preprocessed):
        place.mkdir(parents=True)
        (place / "splits_final.json").write_text('[{"train": ["old"], "val": ["old"]}]')
    (folder / "dataset.json").write_text('{"old": "tags"}')
    replace = tag_modalities._replace_file

    def stop_at_the_tags(content, target):
        if target.endswith("dataset.json"):
            raise interruption
        replace(content, target)

    monkeypatch.setattr(tag_modalities, "_replace_file", stop_at_the_tags)
    with pytest.raises(ConversionError if isinstance(interruption, OSError) else type(interruption)):
        tag_modalities._commit(str(folder), {"new": "tags"}, [{"train": ["new"], "val": ["new"]}],
                               str(tmp_path / "preprocessed"))
    for place in (folder, preprocessed):
        assert (place / "splits_final.json").read_text() == '[{"train": ["old"], "val": ["old"]}]'
        assert [f for f in os.listdir(place) if f.endswith(".incomplete")] == []
    assert (folder / "dataset.json").read_text() == '{"old": "tags"}'


def test_images_of_another_ending_are_named_not_passed_over(tmp_path, capsys):
    from dataset_conversion.errors import ConversionWarning
    from dataset_conversion.tag_modalities import raw_dataset
    from nnunetv2_csa.tools.mixed_prediction import cases_of_folder

    folder = tmp_path / "Dataset906_X"
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "dataset.json").write_text(json.dumps({"file_ending": ".nii.gz", "labels": {"background": 0}}))
    for name in ("a_0000.nii.gz", "b_0000.NII.GZ", "c_0000.mha", "notes.txt"):
        (folder / "imagesTr" / name).write_bytes(b"")
    with pytest.warns(ConversionWarning, match=r"2 image file\(s\) in .*imagesTr do not end in the dataset's "
                                               r"file_ending '\.nii\.gz'.*: b_0000\.NII\.GZ, c_0000\.mha;"):
        assert raw_dataset("Dataset906_X", str(tmp_path))[2] == ["a"]
    # the mixed-modality predictor reads an input folder the same way
    assert list(cases_of_folder(str(folder / "imagesTr"), ".nii.gz")) == ["a"]
    assert "warning: 2 image file(s) in -i" in capsys.readouterr().err


@pytest.fixture(scope="module")
def plain_nnunet_dataset(tmp_path_factory):
    """A phantom converted by this package, then stripped to a plain nnU-Net raw dataset (no
    tags, no split): the converter's tags and split are the answer the tagging must reproduce."""
    from nnunetv2_csa.tools.phantom import write_mscmrseg_phantom
    root = tmp_path_factory.mktemp("tagging")
    env = nnunet_environment(root)
    write_mscmrseg_phantom(str(root / "phantom"), n_patients=6, modalities=("LGE", "C0"), seed=4, in_plane_size=48)
    run_command(["nnUNetv2_csa_convert_mscmrseg", "-i", str(root / "phantom"), "-d", str(TAGGED_DATASET_ID),
                 "--modalities", "LGE", "C0"], env)
    name = next(d for d in os.listdir(env["nnUNet_raw"]) if d.startswith(f"Dataset{TAGGED_DATASET_ID}_"))
    folder = os.path.join(env["nnUNet_raw"], name)
    with open(os.path.join(folder, "dataset.json")) as f:
        converted = json.load(f)
    with open(os.path.join(folder, "splits_final.json")) as f:
        converted["splits"] = json.load(f)
    plain = {k: v for k, v in converted.items() if not k.startswith("csa_") and k != "splits"}
    with open(os.path.join(folder, "dataset.json"), "w") as f:
        json.dump(plain, f)
    os.remove(os.path.join(folder, "splits_final.json"))
    shutil.rmtree(env["nnUNet_preprocessed"])
    os.makedirs(env["nnUNet_preprocessed"])
    return env, folder, converted


@pytest.mark.integration
def test_tagging_a_plain_dataset_reproduces_the_converters_tags_and_split_rules(plain_nnunet_dataset):
    # the converter's tags are the ones every trainer is tested with: equal tags train alike
    env, folder, converted = plain_nnunet_dataset
    images_before = _tree_digest(os.path.join(folder, "imagesTr")) + _tree_digest(os.path.join(folder, "labelsTr"))
    plain_json = open(os.path.join(folder, "dataset.json")).read()
    tag = ["nnUNetv2_csa_tag_modalities", "-d", str(TAGGED_DATASET_ID), "--modality", "LGE", r"patient\d+_LGE",
           "--modality", "C0", r"patient\d+_C0", "--patient", r"^(patient\d+)_"]

    dry = run_command([*tag, "--dry-run"], env)
    assert "dry run: nothing written" in dry.stdout and re.search(r"LGE \(index 0\): 6 cases", dry.stdout)
    assert open(os.path.join(folder, "dataset.json")).read() == plain_json
    assert not os.path.exists(os.path.join(folder, "splits_final.json"))

    run_command(tag, env)
    with open(os.path.join(folder, "dataset.json")) as f:
        tagged = json.load(f)
    for key in TAG_KEYS:
        assert tagged[key] == converted[key], key
    assert open(os.path.join(folder, "dataset.json.before_csa_tags")).read() == plain_json
    assert _tree_digest(os.path.join(folder, "imagesTr")) + _tree_digest(os.path.join(folder, "labelsTr")) \
        == images_before
    with open(os.path.join(folder, "splits_final.json")) as f:
        splits = json.load(f)
    assert splits == converted["splits"]  # same seed, same patient strata
    for fold in splits:  # a patient's cases share a fold; both modalities on both sides
        val_patients = {tagged["csa_case_patient"][c] for c in fold["val"]}
        assert not val_patients & {tagged["csa_case_patient"][c] for c in fold["train"]}
        for part in ("train", "val"):
            assert {tagged["csa_case_modality"][c] for c in fold[part]} == {"LGE", "C0"}

    again = run_command(tag, env, check=False)
    assert again.returncode == 1 and "--overwrite" in again.stderr and len(again.stderr.strip().splitlines()) == 1


@pytest.mark.integration
def test_a_case_no_rule_matches_stops_with_one_line_and_changes_nothing(plain_nnunet_dataset):
    env, folder, _ = plain_nnunet_dataset
    before = _tree_digest(folder)
    result = run_command(["nnUNetv2_csa_tag_modalities", "-d", str(TAGGED_DATASET_ID), "--overwrite",
                          "--modality", "LGE", r"patient00[1-5]_LGE", "--modality", "C0", r"patient\d+_C0"],
                         env, check=False)
    assert result.returncode == 1
    assert result.stderr.strip() == ("error: 1 case(s) match no --modality: patient006_LGE. Each regular expression "
                                     "must match whole case names; fix them until every case matches exactly one "
                                     "(check with --dry-run)")
    assert _tree_digest(folder) == before

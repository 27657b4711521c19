"""Every console command of pyproject.toml, given malformed option values (missing folders, negative
or non-numeric numbers, names that are paths, ids that do not exist, a file where a folder belongs),
ends with a non-zero exit status and one ``error:`` line, never a traceback.

The entry points run in this process (stderr captured, ``SystemExit`` caught): one import of each
command instead of a fresh interpreter per case. An exception that escapes a command is what the
user would see as a traceback, so it counts as one here."""
import contextlib
import importlib
import io
import json
import os
import shutil
import sys
import tomllib
import traceback

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(ROOT, "pyproject.toml"), "rb") as _f:
    CONSOLE_SCRIPTS = {name: target for name, target in tomllib.load(_f)["project"]["scripts"].items()
                       if name.startswith("nnUNetv2_csa_")}

NO_IMAGES_ID, NULL_JSON_ID, TAGGED_ID, MALFORMED_SPLIT_ID, MALFORMED_TAGS_ID, UNKNOWN_ID = 901, 902, 903, 904, 905, 977
TAGGED = str(TAGGED_ID)

# {tmp}: a fresh folder; {file}: a plain file in it; {missing}: a path that does not exist; {raw}:
# nnUNet_raw, holding Dataset901 (dataset.json, no imagesTr) and Dataset902 (dataset.json holding null),
# neither preprocessed, and Dataset903 (two tagged cases, empty stand-ins for their image and label files,
# preprocessed: dataset.json, a split, nnUNetPlans and nnUNetPlansUnprocessed, whose 2d data are missing), and
# Dataset904 to 908, its copies with a malformed split, tags, other-modality cases, labels, file ending;
# {model}: a model folder with plans.json and an empty fold_0; {users_report}: a folder of the user's
# report.md, results.csv and notes.txt. A case is its arguments, or (arguments,
# what its error line must say) where an earlier check could otherwise answer first
CONVERTER = ["-i", "{missing}", "-d", "501"]
RETAG = ["--overwrite", "--dry-run"]
NAME_LIMIT = "must be 1 to 100 letters, digits"
MALFORMED = {
    "nnUNetv2_csa_convert_mscmrseg": [
        CONVERTER, ["-i", "{tmp}", "-d", "501", "--seed", "-1"], ["-i", "{tmp}", "-d", "-5"],
        ["-i", "{tmp}", "-d", "1000"], ["-i", "{tmp}", "-d", "x"],
        (["-i", "{tmp}", "-d", "501", "--name", "../x"], NAME_LIMIT),
        (["-i", "{tmp}", "-d", "501", "--name", ""], NAME_LIMIT),
        (["-i", "{tmp}", "-d", "501", "--name", "a" * 300], NAME_LIMIT),
        ["-i", "{tmp}", "-d", "501", "--crop", "0", "5"], ["-i", "{tmp}", "-d", "501", "-np", "0"],
        (["-i", "{tmp}", "-d", "501", "--crop", "224", "100000"], "from 1 to 2048 pixels"),
        ["-i", "{tmp}", "-d", "501", "-o", "{file}"], ["-i", "{file}", "-d", "501"]],
    "nnUNetv2_csa_convert_mmwhs": [CONVERTER, ["-i", "{tmp}", "-d", "502", "--seed", "x"],
                                   ["-i", "{tmp}", "-d", "502", "-np", "-2"]],
    "nnUNetv2_csa_convert_myops": [CONVERTER, ["-i", "{tmp}", "-d", "503", "--crop", "-1", "3"],
                                   (["-i", "{tmp}", "-d", "503", "--name", "a/b"], NAME_LIMIT)],
    "nnUNetv2_csa_tag_modalities": [
        ["-d", str(UNKNOWN_ID), "--modality", "LGE", ".*"], ["-d", str(NULL_JSON_ID), "--modality", "LGE", ".*"],
        ["-d", str(NO_IMAGES_ID), "--modality", "LGE", ".*"],
        (["-d", "../x", "--modality", "LGE", ".*"], "neither a dataset id nor a folder name"),
        ["-d", str(NO_IMAGES_ID), "--modality", "../../escaped", ".*"],
        ["-d", str(NO_IMAGES_ID), "--modality", "LGE", "("], ["-d", str(NO_IMAGES_ID), "--csv", "{missing}"],
        ["-d", str(NO_IMAGES_ID), "--modality", "LGE", ".*", "--seed", "-1"],
        ["-d", str(NO_IMAGES_ID), "--modality", "LGE", ".*", "--raw", "{missing}"],
        (["-d", TAGGED, "--modality", "../../escaped_LGE", ".*LGE", "--modality", "C0", ".*C0", *RETAG],
         "not a plain name"),
        (["-d", TAGGED, "--modality", "lge", ".*LGE", "--modality", "LGE", ".*C0", *RETAG], "differ only in case"),
        (["-d", TAGGED, "--modality", "LGE", "(", "--modality", "C0", ".*C0", *RETAG], "("),
        (["-d", TAGGED, "--modality", "LGE", ".*LGE", "--modality", "C0", ".*C0", "--patient", "(", *RETAG], "("),
        (["-d", TAGGED, "--modality", "LGE", ".*LGE", "--modality", "C0", ".*C0", "--split", "9-fold"],
         "invalid choice"),
        (["-d", "908", "--modality", "LGE", ".*LGE", "--modality", "C0", ".*C0", *RETAG],
         "file_ending 5 is not a file name ending"),
        (["-d", "909", "--modality", "LGE", ".*LGE", "--modality", "C0", ".*C0", "--dry-run"],
         "is not a plain file name (UTF-8"),
        (["-d", TAGGED, "--csv", "{missing}", *RETAG], "missing"), (["-d", TAGGED, "--csv", "{file}", *RETAG], "a_file.txt")],
    "nnUNetv2_csa_phantom": [
        ["--layout", "mscmrseg", "-o", "{tmp}/p", "-n", "-1"], ["--layout", "myops", "-o", "{tmp}/p", "-n", "x"],
        ["--layout", "mmwhs", "-o", "{tmp}/p", "--seed", "-1"], ["--layout", "mmwhs", "-o", "{tmp}/p", "--size", "2"],
        (["--layout", "mmwhs", "-o", "{tmp}/p", "--size", "100000"], "from 32"),
        (["--layout", "myops", "-o", "{tmp}/p", "--size", "100000"], "from 48"),
        ["--layout", "mscmrseg", "-o", "{file}", "-n", "1", "--size", "16"]],
    "nnUNetv2_csa_evaluate": [
        ["-pred", "{missing}", "-ref", "{tmp}", "-l", "1"], ["-pred", "{tmp}", "-ref", "{missing}", "-l", "1"],
        ["-pred", "{tmp}", "-ref", "{tmp}", "-l", "x"], ["-pred", "{tmp}", "-ref", "{tmp}", "-l", "-1"],
        ["-pred", "{tmp}", "-ref", "{tmp}", "-l", "1", "-np", "0"],
        (["-pred", "{tmp}", "-ref", "{tmp}", "-l", "1"], "the prediction and the reference folder are both"),
        (["-pred", "{tmp}", "-ref", "{raw}", "-l", "1", "--hd95", "medpy"], "invalid choice"),
        (["-pred", "{tmp}", "-ref", "{raw}", "-l", "1", "-o", "{file}"], "is a file"),
        ["-pred", "{tmp}", "-ref", "{tmp}", "-djfile", "{missing}"],
        ["-pred", "{tmp}", "-ref", "{tmp}", "-djfile", "{raw}/Dataset902_Null/dataset.json"],
        (["-pred", "{tmp}", "-ref", "{raw}", "-djfile", "{raw}/Dataset905_MalformedTags"], "must be a list of names"),
        (["-pred", "{tmp}", "-ref", "{raw}", "-djfile", "{raw}/Dataset906_MalformedOther"],
         "'csa_other_modality_cases' must be an object case ->"),
        (["-pred", "{tmp}", "-ref", "{raw}", "-djfile", "{raw}/Dataset908_MalformedEnding"],
         "file_ending 5 is not a file name ending"),
        (["-pred", "{empty}", "-ref", "{text}", "-l", "1"], "p1_LGE_0000.nii.gz is "),
        (["-pred", "{text}", "-ref", "{empty}", "-l", "1"], "p1_LGE_0000.nii.gz is "),
        (["-pred", "{undecodable}", "-ref", "{text}", "-l", "1"], "the file name is not UTF-8"),
        (["-pred", "{text}", "-ref", "{undecodable}", "-l", "1"], "the file name is not UTF-8")],
    "nnUNetv2_csa_heldout": [
        ["-d", str(UNKNOWN_ID), "-o", "{tmp}/h"], ["-d", "../x", "-o", "{tmp}/h"],
        ["-d", str(NO_IMAGES_ID), "-o", "{tmp}/h", "-f", "-1"], ["-d", str(NULL_JSON_ID), "-o", "{tmp}/h"],
        ["-d", str(NO_IMAGES_ID), "-o", "{file}"], ["-d", str(NO_IMAGES_ID), "-o", "{tmp}/h", "-f", "x"],
        (["-d", TAGGED, "-o", "/proc/heldout"], "cannot write into /proc"),
        (["-d", str(MALFORMED_SPLIT_ID), "-o", "{tmp}/h"], "is not a split"),
        (["-d", str(MALFORMED_TAGS_ID), "-o", "{tmp}/h"], "must be a list of names"),
        (["-d", "906", "-o", "{tmp}/h"], "'csa_other_modality_cases' must be an object case ->"),
        (["-d", "908", "-o", "{tmp}/h"], "file_ending 5 is not a file name ending"),
        (["-d", TAGGED, "-o", "{tmp}/h"], "is empty (0 bytes)")],
    "nnUNetv2_csa_export_modality": [
        ["-m", "{missing}", "--modality", "LGE", "-o", "{tmp}/e"], ["-m", "{tmp}", "--modality", "LGE", "-o", "{tmp}/e"],
        ["-m", "{model}", "--modality", "LGE", "-o", "{tmp}/e", "-f", "0", "0"],
        ["-m", "{model}", "--modality", "LGE", "-o", "{tmp}/e", "-f", "-1"],
        ["-m", "{model}", "--modality", "../x", "-o", "{tmp}/e"],
        ["-m", "{model}", "--modality", "LGE", "-o", "{missing}/e"],
        ["-m", "{model}", "--modality", "LGE", "-o", "{model}"],
        (["-m", "{model}", "--modality", "LGE", "-o", "{tmp}/e", "-chk", "../../x.pth"], "-chk '../../x.pth' is not"),
        # a folder no one may write into, root included
        (["-m", "{model}", "--modality", "LGE", "-o", "/proc/exported"], "cannot write into /proc")],
    "nnUNetv2_csa_trainer_dir": [["--bogus"], ["-d", "1"]],
    "nnUNetv2_csa_benchmark": [
        ["-d", str(UNKNOWN_ID), "--budget", "1", "5"], ["-d", str(NO_IMAGES_ID), "--budget", "1", "5"],
        ["-d", str(NULL_JSON_ID), "--budget", "1", "5"], ["-d", "../x", "--budget", "1", "5"],
        ["-d", str(NO_IMAGES_ID), "--budget", "-1", "5"], ["-d", str(NO_IMAGES_ID), "--budget", "x", "5"],
        ["-d", str(NO_IMAGES_ID), "--budget", "1", "5", "-f", "-1"],
        ["-d", str(NO_IMAGES_ID), "--budget", "1", "5", "--folds", "x"],
        ["-d", str(NO_IMAGES_ID), "--budget", "1", "5", "--timing-iterations", "-1"],
        (["-d", str(NO_IMAGES_ID), "--budget", "1", "5", "-c", "../x"], "-c '../x' is not a plain name"),
        (["-d", str(NO_IMAGES_ID), "--budget", "1", "5", "-p", "a/b"], "-p 'a/b' is not a plain name"),
        (["-d", TAGGED, "--budget", "1", "5", "-o", "{file}"], "is a file"),
        (["-d", TAGGED, "--budget", "1", "5", "-o", "{users_report}"],
         "holds report.md, results.csv, which the benchmark did not write"),
        (["-d", TAGGED, "--budget", "1", "5", "-o", "/proc/report"], "cannot write into /proc"),
        (["-d", TAGGED, "--budget", "1", "5", "-p", "nnUNetPlansTypo"], "nnUNetPlansTypo.json does not exist"),
        (["-d", TAGGED, "--budget", "1", "5", "-c", "3d_typo"], "'3d_typo' is not in"),
        (["-d", TAGGED, "--budget", "1", "5", "-p", "nnUNetPlansUnprocessed"],
         "configuration is not preprocessed yet"),
        (["-d", TAGGED, "--budget", "1", "5", "-f", "7"], "fold(s) [7]"),
        (["-d", str(MALFORMED_SPLIT_ID), "--budget", "1", "5"], "is not a split"),
        (["-d", str(MALFORMED_TAGS_ID), "--budget", "1", "5"], "must be a list of names"),
        (["-d", "906", "--budget", "1", "5"], "'csa_other_modality_cases' must be an object case ->"),
        (["-d", "907", "--budget", "1", "5"], "give dataset.json 'labels' as an object name -> integer"),
        (["-d", "908", "--budget", "1", "5"], "file_ending 5 is not a file name ending"),
        (["-d", TAGGED, "--budget", "1", "5", "--rows", "Bogus"], "invalid choice")],
    "nnUNetv2_csa_demo": [
        ["--output", "{file}"], ["--dataset-id", "-1", "--output", "{tmp}/d"],
        ["--budget", "0", "0", "--output", "{tmp}/d"], ["--phantom-patients", "-1", "--output", "{tmp}/d"],
        ["--phantom-size", "x", "--output", "{tmp}/d"],
        (["--phantom-size", "100000", "--output", "{tmp}/d"], "from 48"),
        ["--rows", "Bogus", "--output", "{tmp}/d"],
        ["--timing-iterations", "-1", "--output", "{tmp}/d"], ["--data", "{missing}", "--output", "{tmp}/d"]],
    "nnUNetv2_csa_inference_instructions": [
        ["-d", str(UNKNOWN_ID)], ["-d", "../x"], ["-d", TAGGED, "-np", "0"],
        (["-d", TAGGED], "run nnUNetv2_find_best_configuration"),
        (["-d", str(MALFORMED_SPLIT_ID)], "'folds' must be a non-empty list of fold numbers"),
        (["-d", "906"], "fold 3 of the cross-validation is not in")],
    "nnUNetv2_csa_predict": [
        ["-i", "{missing}", "-o", "{tmp}/o", "-d", str(UNKNOWN_ID), "-c", "2d"],
        ["-i", "{tmp}", "-o", "{tmp}/o", "-d", "../x", "-c", "2d"], ["-i", "{tmp}", "-o", "{tmp}/o"],
        ["-i", "{tmp}", "-o", "{file}", "-d", str(NO_IMAGES_ID), "-c", "2d", "--csv", "{missing}"],
        *[(["-i", "{" + kind + "}", "-o", "{tmp}/o", "-d", TAGGED, "-c", "2d", "-tr", "nnUNetTrainerCSA", "--dry-run"],
           says) for kind, says in (("empty", "is empty (0 bytes)"), ("text", "is not an image SimpleITK can read"),
                                    ("undecodable", "the file name is not UTF-8"))]],
}


def run_in_process(name: str, args: list[str]) -> tuple[int, str]:
    """(exit status, stderr) of console command ``name`` run as its script runs it: ``sys.exit(main())``."""
    module, function = CONSOLE_SCRIPTS[name].split(":")
    main = getattr(importlib.import_module(module), function)
    stderr = io.StringIO()
    saved_argv = sys.argv
    sys.argv = [name, *args]
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            try:
                status = main()
            except SystemExit as exit:
                status = exit.code
            except BaseException:  # noqa: BLE001 - what the user would see as a traceback
                traceback.print_exc()
                status = 1
    finally:
        sys.argv = saved_argv
    if status is not None and not isinstance(status, int):
        stderr.write(f"{status}\n")  # sys.exit("message") prints the message
        status = 1
    return status or 0, stderr.getvalue()


@pytest.fixture
def hostile_setup(tmp_path, monkeypatch):
    raw, preprocessed, results = (tmp_path / name for name in ("raw", "preprocessed", "results"))
    for folder in (raw, preprocessed, results):
        folder.mkdir()
    monkeypatch.setenv("nnUNet_raw", str(raw))
    monkeypatch.setenv("nnUNet_preprocessed", str(preprocessed))
    monkeypatch.setenv("nnUNet_results", str(results))
    monkeypatch.delenv("NNUNETV2_CSA_TRACEBACK", raising=False)
    no_images = raw / f"Dataset{NO_IMAGES_ID}_NoImages"
    no_images.mkdir()
    (no_images / "dataset.json").write_text(json.dumps({"channel_names": {"0": "MRI"}, "labels": {"background": 0,
                                                        "myo": 1}, "numTraining": 2, "file_ending": ".nii.gz"}))
    tagged = {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "myo": 1}, "numTraining": 2,
              "file_ending": ".nii.gz", "csa_modalities": ["LGE", "C0"],
              "csa_case_modality": {"p1_LGE": "LGE", "p1_C0": "C0"}}
    for root in (raw, preprocessed):
        (root / f"Dataset{TAGGED_ID}_Tagged").mkdir()
        (root / f"Dataset{TAGGED_ID}_Tagged" / "dataset.json").write_text(json.dumps(tagged))
    (raw / f"Dataset{TAGGED_ID}_Tagged" / "imagesTr").mkdir()
    (raw / f"Dataset{TAGGED_ID}_Tagged" / "labelsTr").mkdir()
    for case in tagged["csa_case_modality"]:
        (raw / f"Dataset{TAGGED_ID}_Tagged" / "imagesTr" / f"{case}_0000.nii.gz").write_bytes(b"")
        (raw / f"Dataset{TAGGED_ID}_Tagged" / "labelsTr" / f"{case}.nii.gz").write_bytes(b"")
    (preprocessed / f"Dataset{TAGGED_ID}_Tagged" / "nnUNetPlans.json").write_text(
        json.dumps({"configurations": {"2d": {}}}))
    (preprocessed / f"Dataset{TAGGED_ID}_Tagged" / "nnUNetPlansUnprocessed.json").write_text(
        json.dumps({"configurations": {"2d": {"data_identifier": "nnUNetPlansUnprocessed_2d"}}}))
    (preprocessed / f"Dataset{TAGGED_ID}_Tagged" / "splits_final.json").write_text(
        json.dumps([{"train": ["p1_LGE"], "val": ["p1_C0"]}]))
    # Dataset903 again as Dataset904, whose splits_final.json (raw and preprocessed) holds lists, not folds,
    # and as Dataset905, whose tags are a list and null where objects belong
    for root in (raw, preprocessed):
        shutil.copytree(root / f"Dataset{TAGGED_ID}_Tagged", root / f"Dataset{MALFORMED_SPLIT_ID}_MalformedSplit")
        (root / f"Dataset{MALFORMED_SPLIT_ID}_MalformedSplit" / "splits_final.json").write_text("[[], []]")
        shutil.copytree(root / f"Dataset{TAGGED_ID}_Tagged", root / f"Dataset{MALFORMED_TAGS_ID}_MalformedTags")
        (root / f"Dataset{MALFORMED_TAGS_ID}_MalformedTags" / "dataset.json").write_text(json.dumps(
            {**tagged, "csa_case_modality": ["p1_LGE", "LGE"], "csa_case_patient": None}))
    # and Dataset906 to 908, whose other-modality cases (of an --unpaired conversion), labels or file ending
    # are malformed
    for name, malformed in (("Dataset906_MalformedOther", {"csa_other_modality_cases": {"p1_C0": "C0"}}),
                            ("Dataset907_MalformedLabels", {"labels": ["background", "myo"]}),
                            ("Dataset908_MalformedEnding", {"file_ending": 5})):
        for root in (raw, preprocessed):
            shutil.copytree(root / f"Dataset{TAGGED_ID}_Tagged", root / name)
            (root / name / "dataset.json").write_text(json.dumps({**tagged, **malformed}))
    # Dataset909: an image in imagesTr whose name is not UTF-8
    undecodable = raw / "Dataset909_Undecodable"
    (undecodable / "imagesTr").mkdir(parents=True)
    (undecodable / "dataset.json").write_text(json.dumps({k: v for k, v in tagged.items() if not k.startswith("csa_")}))
    (undecodable / "imagesTr" / os.fsdecode(b"p\xff1_LGE_0000.nii.gz")).write_bytes(b"")
    (raw / f"Dataset{NULL_JSON_ID}_Null").mkdir()
    (raw / f"Dataset{NULL_JSON_ID}_Null" / "dataset.json").write_text("null")
    model = tmp_path / "model"
    (model / "fold_0").mkdir(parents=True)
    (model / "plans.json").write_text(json.dumps({"csa_modalities": ["LGE", "C0"]}))
    (model / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "myo": 1}}))
    users_report = tmp_path / "users_report"
    users_report.mkdir()
    for name in ("report.md", "results.csv", "notes.txt"):
        (users_report / name).write_text("the user's")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (scratch / "a_file.txt").write_text("not a folder")
    # folders of one image that no reader can open: empty, text named .nii.gz, a name that is not UTF-8
    unreadable = {}
    for kind, name, content in (("empty", "p1_LGE_0000.nii.gz", b""),
                                ("text", "p1_LGE_0000.nii.gz", b"an image? no\n" * 50),
                                ("undecodable", os.fsdecode(b"p\xff1_LGE_0000.nii.gz"), b"")):
        unreadable[kind] = tmp_path / kind
        unreadable[kind].mkdir()
        (unreadable[kind] / name).write_bytes(content)
    # a trained model of Dataset903 as nnUNetv2_csa_predict finds it, and nnU-Net's inference_information.json,
    # malformed (Dataset904) or naming a fold the split does not have (Dataset906)
    trained = results / f"Dataset{TAGGED_ID}_Tagged" / "nnUNetTrainerCSA__nnUNetPlans__2d"
    trained.mkdir(parents=True)
    (trained / "plans.json").write_text(json.dumps({"csa_modalities": ["LGE", "C0"]}))
    (trained / "dataset.json").write_text(json.dumps(tagged))
    information = {"folds": [3], "all_results": {"m": 0.5}, "best_model_or_ensemble": {"selected_model_or_models": [
        {"trainer": "nnUNetTrainerCSA", "plans_identifier": "nnUNetPlans", "configuration": "2d"}]}}
    for name, content in (("Dataset904_MalformedSplit", {**information, "folds": "0"}),
                          ("Dataset906_MalformedOther", information)):
        (results / name).mkdir()
        (results / name / "inference_information.json").write_text(json.dumps(content))
    (preprocessed / "Dataset906_MalformedOther" / "gt_segmentations").mkdir()
    return {"tmp": str(scratch), "file": str(scratch / "a_file.txt"), "missing": str(tmp_path / "missing"),
            "raw": str(raw), "model": str(model), "users_report": str(users_report),
            **{kind: str(folder) for kind, folder in unreadable.items()}}


CASES = [(name, *(case if isinstance(case, tuple) else (case, ""))) for name, cases in MALFORMED.items()
         for case in cases]


def test_every_console_command_is_walked():
    assert set(MALFORMED) == set(CONSOLE_SCRIPTS)


@pytest.mark.parametrize("name,args,says", CASES, ids=[f"{n.removeprefix('nnUNetv2_csa_')}:{' '.join(a)}"[:80]
                                                       for n, a, _ in CASES])
def test_malformed_option_values_end_in_one_error_line(name, args, says, hostile_setup):
    args = [a.format(**hostile_setup) for a in args]
    status, stderr = run_in_process(name, args)
    assert status != 0, stderr
    assert "Traceback" not in stderr, stderr
    error_lines = [line for line in stderr.splitlines() if line.startswith(("error: ", f"{name}: error: "))]
    assert len(error_lines) == 1, stderr
    assert stderr.rstrip().splitlines()[-1] == error_lines[0], stderr
    assert says in error_lines[0]

"""The all-or-nothing write of a dataset: output folders checked before anything is written, the
new dataset (and the split for nnUNet_preprocessed) staged next to their targets and moved into
place together, or not at all.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from typing import Sequence

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

from dataset_conversion.errors import ConversionError, ConversionWarning
from nnunetv2_csa.atomic_files import current_umask
from nnunetv2_csa.modality import CASE_MODALITY_KEY, MODALITIES_KEY
from nnunetv2_csa.tools.inputs import nearest_existing


def resolve_output_root(output_root: str | None) -> str:
    output_root = output_root or os.environ.get("nnUNet_raw")
    if not output_root:
        raise ConversionError("no output folder: give -o/--output or set the nnUNet_raw environment variable "
                              "(nnU-Net's raw data folder)")
    return os.path.abspath(output_root)


#: longest dataset name: with "DatasetXXX_" and nnU-Net's "<trainer>__<plans>__<configuration>" below it, the
#: folder names stay far below file systems' 255 bytes
MAX_DATASET_NAME = 100


def dataset_folder_name(dataset_id: int, name: str) -> str:
    if not 1 <= int(dataset_id) <= 999:
        raise ConversionError(f"dataset id {dataset_id} is outside 1..999 (nnU-Net names datasets DatasetXXX_Name)")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_\-]*", name) or len(name) > MAX_DATASET_NAME:
        raise ConversionError(f"dataset name {name!r} must be 1 to {MAX_DATASET_NAME} letters, digits, '_' or '-', "
                              f"starting with a letter or digit (it becomes a folder name); choose another --name")
    return f"Dataset{int(dataset_id):03d}_{name}"


@contextlib.contextmanager
def claim_dataset_id(output_root: str, dataset_id: int):
    """Holds dataset id ``dataset_id`` of ``output_root`` for one conversion at a time: two at once
    with different names would each find the id free and leave two DatasetXXX_* folders, which
    nnU-Net refuses. An exclusive lock on a file in the temporary folder, keyed by the output
    folder; the system releases it when the process ends, however it ends (no stale claim). One
    machine only: conversions on two machines sharing a network folder are not held apart."""
    if fcntl is None:  # no flock (Windows): no claim, as before
        yield
        return
    key = hashlib.sha1(os.path.realpath(output_root).encode()).hexdigest()[:16]
    path = os.path.join(tempfile.gettempdir(), f"nnunetv2_csa_Dataset{int(dataset_id):03d}_{key}.lock")
    with open(path, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConversionError(f"another conversion of dataset id {dataset_id} into {output_root} is running (it "
                                  f"holds {path}); wait for it to end, or choose another -d/--dataset-id") from None
        yield  # closing the file releases the lock


def _same_id_folders(root: str | None, dataset_id: int) -> list[str]:
    if not root or not os.path.isdir(root):
        return []
    prefix = f"Dataset{int(dataset_id):03d}_"
    return sorted(os.path.join(root, d) for d in os.listdir(root)
                  if d.startswith(prefix) and os.path.isdir(os.path.join(root, d)))


def check_output_free(output_root: str, dataset_id: int, folder_name: str, overwrite: bool,
                      preprocessed_root: str | None) -> list[str]:
    """The existing raw folders for this id (to replace with --overwrite); errors when one
    exists without --overwrite, or when preprocessed/results folders carry another name
    for the id (nnU-Net then refuses the id as ambiguous)."""
    nearest = nearest_existing(output_root)  # where the new folders would be created
    if not os.path.isdir(nearest):
        raise ConversionError(f"{nearest} is a file, not a folder, so the output folder {output_root} cannot be "
                              f"there: choose a folder with -o/--output (or nnUNet_raw)")
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise ConversionError(f"cannot write into {nearest}: choose a writable -o/--output (or nnUNet_raw)")
    target = os.path.join(output_root, folder_name)
    if os.path.lexists(target) and not os.path.isdir(target):
        raise ConversionError(f"{target} exists and is not a folder: remove or rename it, or choose another "
                              f"-d/--dataset-id or --name")
    existing = _same_id_folders(output_root, dataset_id)
    if existing and not overwrite:
        raise ConversionError(f"dataset id {dataset_id} already exists: {', '.join(existing)}. Choose another "
                              f"-d/--dataset-id, or add --overwrite to replace it once the new one is complete")
    for variable, root in (("nnUNet_preprocessed", preprocessed_root),
                           ("nnUNet_results", os.environ.get("nnUNet_results"))):
        others = [f for f in _same_id_folders(root, dataset_id) if os.path.basename(f) != folder_name]
        if others:
            raise ConversionError(
                f"{variable} holds {', '.join(others)} for dataset id {dataset_id} under another name than "
                f"{folder_name}; nnU-Net would then find two names for one id and refuse it. Remove that folder, "
                f"convert with --name {os.path.basename(others[0]).split('_', 1)[1]}, or choose another -d")
    return existing


def _missing_ancestors(path: str) -> list[str]:
    missing = []
    while not os.path.exists(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return missing


def write_json(obj, path: str) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def _staged_splits_prefix() -> str:
    return f".splits_final.{os.getpid()}."


def _remove_leftovers(folder: str, prefix: str) -> None:
    """Removes this process' temporary files and folders (named ``prefix``...) in ``folder``."""
    if not os.path.isdir(folder):
        return
    for name in os.listdir(folder):
        if name.startswith(prefix):
            path = os.path.join(folder, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.remove(path)


@dataclass
class _StagedSplits:
    """``splits_final.json`` for nnUNet_preprocessed, written next to its target, not yet in place."""

    temporary: str
    target: str
    created_dirs: list[str]

    def discard(self) -> None:
        if self.temporary and os.path.exists(self.temporary):
            os.remove(self.temporary)
        for d in self.created_dirs:  # deepest first
            try:
                os.rmdir(d)
            except OSError:
                break


def _stage_preprocessed_splits(preprocessed_root: str, folder_name: str, splits: list,
                               dataset_id: int) -> _StagedSplits:
    """nnU-Net's trainer reads the split from the preprocessed folder; its planner copies the
    raw one there only when none exists and otherwise asserts that both agree, so a split
    left from an earlier conversion of this id must be replaced, not kept."""
    preprocessed_folder = os.path.join(preprocessed_root, folder_name)
    target = os.path.join(preprocessed_folder, "splits_final.json")
    if os.path.isfile(target):
        try:
            with open(target) as f:
                previous = json.load(f)
        except (ValueError, OSError) as e:
            previous, reason = None, f"it was not a readable split ({type(e).__name__}: {e})"
        else:
            reason = "it came from an earlier conversion"
        if previous != splits:
            warnings.warn(f"replaced {target}: {reason}; preprocessed data in {preprocessed_folder} may be stale: "
                          f"rerun nnUNetv2_plan_and_preprocess -d {int(dataset_id)} --clean", ConversionWarning,
                          stacklevel=3)
    if not os.path.isdir(preprocessed_root):
        # made without a word, a typo'd tree would receive the split while nnU-Net reads another
        warnings.warn(f"the preprocessed folder {preprocessed_root} (nnUNet_preprocessed) did not exist and is "
                      f"created for the split; if the variable holds a typo, correct it and convert again",
                      ConversionWarning, stacklevel=3)
    staged = _StagedSplits("", target, _missing_ancestors(preprocessed_folder))
    try:
        os.makedirs(preprocessed_folder, exist_ok=True)
        handle, staged.temporary = tempfile.mkstemp(prefix=_staged_splits_prefix(), suffix=".incomplete",
                                                    dir=preprocessed_folder)
        os.close(handle)
        write_json(splits, staged.temporary)
        os.chmod(staged.temporary, 0o666 & ~current_umask())
    except OSError as e:
        staged.discard()
        raise ConversionError(f"cannot write {target} ({e.strerror or e}): make {preprocessed_folder} writable, "
                              f"or unset nnUNet_preprocessed (the split is also written to the raw dataset)") from None
    return staged


#: what nnU-Net's preprocessed copy of dataset.json must agree on with the raw one
_PREPROCESSED_AGREES_ON = ("labels", "numTraining", MODALITIES_KEY, CASE_MODALITY_KEY)


def stale_preprocessed_message(preprocessed_root: str | None, folder_name: str, dataset_json: dict,
                               dataset_id: int) -> str | None:
    """A warning when ``nnUNet_preprocessed`` holds a dataset.json of an earlier conversion
    (e.g. replaced with --overwrite) that differs from the new one in labels, cases or
    modalities: nnU-Net trains from the preprocessed copy until the dataset is preprocessed again."""
    path = os.path.join(preprocessed_root, folder_name, "dataset.json") if preprocessed_root else None
    if path is None or not os.path.isfile(path):
        return None
    rerun = f"run nnUNetv2_plan_and_preprocess -d {dataset_id} again before training"
    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, ValueError):
        return f"{path} is not readable JSON: {rerun}"
    differing = [key for key in _PREPROCESSED_AGREES_ON if old.get(key) != dataset_json.get(key)]
    if not differing:
        return None
    return (f"{path} is nnU-Net's preprocessed copy of an earlier conversion and differs from the new dataset in "
            f"{', '.join(differing)}; nnU-Net trains from the preprocessed data, so {rerun}")



class StagedDataset:
    """A dataset written into a hidden folder beside its target, moved into place by
    :meth:`commit` together with the split staged for nnUNet_preprocessed. Leaving the ``with``
    block without a commit (an error, Ctrl-C, SIGTERM turned into SystemExit) removes everything
    staged and every folder created for it: a failed conversion leaves nothing behind.

    ``existing``: the raw folders of this dataset id that the commit replaces (``--overwrite``);
    they move aside only once the new dataset is complete, and come back if the commit fails."""

    def __init__(self, output_root: str, folder_name: str, preprocessed_root: str | None, dataset_id: int,
                 existing: Sequence[str] = ()):
        self.output_root, self.folder_name, self.dataset_id = output_root, folder_name, dataset_id
        self.preprocessed_root, self.existing = preprocessed_root, list(existing)
        self.final_folder = os.path.join(output_root, folder_name)
        # the process id in the temporary names lets the cleanup find them even when a signal
        # interrupts their creation before their names are known here
        self._prefix = f".{folder_name}.incomplete-{os.getpid()}-"
        self._created_dirs: list[str] = []
        self._splits: _StagedSplits | None = None
        self._committed = False
        self.folder = ""

    def __enter__(self) -> "StagedDataset":
        self._created_dirs = _missing_ancestors(self.output_root)
        try:
            os.makedirs(self.output_root, exist_ok=True)
        except OSError as e:  # what os.access cannot foresee: a read-only file system, a full disk
            raise ConversionError(f"cannot create the output folder {self.output_root} ({e.strerror}): choose a "
                                  f"writable -o/--output (or nnUNet_raw)") from None
        try:
            self.folder = tempfile.mkdtemp(prefix=self._prefix, dir=self.output_root)
            os.chmod(self.folder, 0o777 & ~current_umask())  # mkdtemp makes it private (0700)
        except OSError as e:
            self._discard()
            raise ConversionError(f"cannot write into {self.output_root} ({e.strerror}): choose a writable "
                                  f"-o/--output (or nnUNet_raw)") from None
        except BaseException:
            # a signal (SIGTERM turned into SystemExit, Ctrl-C) while the folder is being made: `with`
            # calls __exit__ only once __enter__ has returned, so the folder is removed here
            self._discard()
            raise
        return self

    def stage_preprocessed_splits(self, splits: list) -> None:
        """nnU-Net's trainer reads the split from nnUNet_preprocessed: it lands with the raw dataset."""
        if self.preprocessed_root:
            self._splits = _stage_preprocessed_splits(self.preprocessed_root, self.folder_name, splits,
                                                      self.dataset_id)

    @property
    def splits_written(self) -> list[str]:
        return [os.path.join(self.final_folder, "splits_final.json")] + ([self._splits.target] if self._splits else [])

    def commit(self) -> None:
        set_aside = []
        moved = False
        try:
            for old in self.existing:
                aside = tempfile.mkdtemp(prefix=f".{os.path.basename(old)}.replaced-", dir=self.output_root)
                os.replace(old, os.path.join(aside, "old"))
                set_aside.append((old, aside))
            os.replace(self.folder, self.final_folder)
            moved = True
            if self._splits is not None:
                os.replace(self._splits.temporary, self._splits.target)
            self._committed = True
        except OSError as e:
            if moved:
                os.replace(self.final_folder, self.folder)
            for old, aside in set_aside:
                os.replace(os.path.join(aside, "old"), old)
                os.rmdir(aside)
            raise ConversionError(f"could not move the converted dataset into place ({e}); nothing was "
                                  f"changed") from None
        for _, aside in set_aside:
            shutil.rmtree(aside, ignore_errors=True)

    def __exit__(self, *exc_info) -> None:
        if not self._committed:
            self._discard()

    def _discard(self) -> None:
        _remove_leftovers(self.output_root, self._prefix)
        if self._splits is not None:
            self._splits.discard()
        elif self.preprocessed_root:
            _remove_leftovers(os.path.join(self.preprocessed_root, self.folder_name), _staged_splits_prefix())
        for d in self._created_dirs:  # deepest first
            try:
                os.rmdir(d)
            except OSError:
                break

"""Which modality a case is, told by its name or by a table: the rules that
``nnUNetv2_csa_tag_modalities`` tags a training set with and ``nnUNetv2_csa_predict``
sorts a mixed test folder by.

A rule is a modality name and a regular expression (Python ``re``) that the whole case
identifier matches; every case must match exactly one rule. A CSV table (columns ``case``,
``modality``, optional ``patient``; a UTF-8 byte-order mark, as Excel writes it, is read)
names each case's modality instead. The converters' datasets need neither: their case
identifiers end in ``_<modality>`` (``patient1_LGE``), which :func:`converter_naming_rules`
turns into rules.
"""
from __future__ import annotations

import csv
import re
from typing import Sequence

from nnunetv2_csa.errors import first_few
from nnunetv2_csa.modality import ModalityTagError, check_modality_names

#: how many offending cases an error names before it says "and N more"
NAMED_IN_ERRORS = 5

Rules = list[tuple[str, re.Pattern]]


def some(cases: Sequence[str]) -> str:
    return first_few(cases, NAMED_IN_ERRORS)


def compile_rules(rules: Sequence[Sequence[str]], minimum: int = 2) -> Rules:
    """(name, compiled expression) for each ``--modality NAME REGEX``, in the order given."""
    compiled, names = [], set()
    for name, pattern in rules:
        if name in names:
            raise ModalityTagError(f"--modality {name} is given twice; give one regular expression per modality "
                                   f"(use | inside it for alternatives)")
        names.add(name)
        try:
            compiled.append((name, re.compile(pattern)))
        except re.error as e:
            raise ModalityTagError(f"--modality {name} {pattern!r} is not a regular expression ({e})") from None
    check_modality_names([name for name, _ in compiled], "--modality")
    if len(compiled) < minimum:
        raise ModalityTagError("give at least two modalities (--modality NAME REGEX, once per modality)"
                               if minimum == 2 else f"give at least {minimum} --modality NAME REGEX")
    return compiled


def converter_naming_rules(modalities: Sequence[str]) -> Rules:
    """The rules of this package's converters' case names: ``<patient>_<modality>``."""
    return [(name, re.compile(f".+_{re.escape(name)}")) for name in modalities]


def modalities_from_rules(cases: Sequence[str], rules: Rules, told_by: str = "--modality") -> dict[str, str]:
    """case -> modality name; every case must fully match exactly one rule (``told_by`` names
    where the rules came from in the error)."""
    assignment, unmatched, ambiguous = {}, [], []
    for case in cases:
        matching = [name for name, pattern in rules if pattern.fullmatch(case)]
        if len(matching) == 1:
            assignment[case] = matching[0]
        elif not matching:
            unmatched.append(case)
        else:
            ambiguous.append(f"{case} ({'/'.join(matching)})")
    if unmatched or ambiguous:
        problems = ([f"{len(unmatched)} case(s) match no {told_by}: {some(unmatched)}"] if unmatched else []) + \
                   ([f"{len(ambiguous)} match two or more: {some(ambiguous)}"] if ambiguous else [])
        raise ModalityTagError(f"{'; '.join(problems)}. Each regular expression must match whole case names; fix "
                               f"them until every case matches exactly one (check with --dry-run)")
    return assignment


def read_tag_csv(path: str) -> tuple[dict[str, str], dict[str, str], list[str]]:
    """(case -> modality, case -> patient, modality names in order of first appearance)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
            columns = rows[0].keys() if rows else []
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ModalityTagError(f"cannot read the CSV {path} ({e}): give a readable CSV file with the columns "
                               f"case, modality and (optionally) patient") from None
    if not {"case", "modality"} <= set(columns):
        raise ModalityTagError(f"{path} needs the columns case, modality (and optionally patient); it has "
                               f"{list(columns)}")
    modality, patient, order = {}, {}, []
    for line, row in enumerate(rows, start=2):
        case, name = (row.get("case") or "").strip(), (row.get("modality") or "").strip()
        if not case or not name:
            raise ModalityTagError(f"{path} line {line}: empty case or modality; fill it in or delete the line")
        if case in modality:
            raise ModalityTagError(f"{path} line {line}: case {case} is listed twice; keep one line per case")
        modality[case] = name
        patient[case] = (row.get("patient") or "").strip() or case
        if name not in order:
            order.append(name)
    check_modality_names(order, path)
    return modality, patient, order

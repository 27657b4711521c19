"""The library (what ``nnUNetv2_train -tr`` imports) stands apart from the tools."""
import ast
import os
import re

import nnunetv2_csa

PACKAGE = os.path.dirname(nnunetv2_csa.__file__)
TOOL_PACKAGES = ("nnunetv2_csa.tools", "dataset_conversion")


def _imported_modules(path: str) -> set[str]:
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _is_tool(module: str) -> bool:
    return any(module == tool or module.startswith(tool + ".") for tool in TOOL_PACKAGES)


def test_no_library_module_imports_a_tool_not_even_inside_a_function():
    library_files = [os.path.join(folder, name) for folder, _, names in os.walk(PACKAGE)
                     if not os.path.relpath(folder, PACKAGE).startswith("tools") for name in names
                     if name.endswith(".py")]
    assert len(library_files) > 20  # the walk found the library, not an empty folder
    offenders = {os.path.relpath(path, PACKAGE): sorted(filter(_is_tool, _imported_modules(path)))
                 for path in library_files}
    assert {path: tools for path, tools in offenders.items() if tools} == {}


def test_the_import_scan_sees_an_import_inside_a_function(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from nnunetv2_csa.tools import benchmark\n")
    assert any(_is_tool(m) for m in _imported_modules(str(module)))


def test_importing_every_trainer_loads_no_tool(trainer_import_probe):
    loaded = trainer_import_probe.stdout.split()
    assert "nnunetv2_csa.training.nnUNetTrainerCSA" in loaded
    assert [m for m in loaded if _is_tool(m)] == []


REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_REPOSITORY_PATH = re.compile(r"^(?:nnunetv2_csa|tests|scripts|dataset_conversion|documentation|docs)/[\w./-]*$")


def _named_paths(markdown: str) -> set[str]:
    """The repository paths a page names in backticks (``nnunetv2_csa/...``, ``tests/...``, ...; a bare
    ``test_*.py`` is a file of ``tests/``), each the first word of its code span."""
    paths = set()
    for span in re.findall(r"`([^`\n]+)`", markdown):
        word = span.split()[0].rstrip(",;:)")
        if _REPOSITORY_PATH.match(word):
            paths.add(word)
        elif re.fullmatch(r"test_\w+\.py", word):
            paths.add(f"tests/{word}")
    return paths


def test_every_file_the_readme_and_the_documentation_name_exists():
    pages = ["README.md"] + [os.path.join("documentation", f) for f in os.listdir(os.path.join(REPOSITORY,
                                                                                              "documentation"))
                             if f.endswith(".md")]
    named = {page: _named_paths(open(os.path.join(REPOSITORY, page)).read()) for page in pages}
    assert len(named["README.md"]) > 20  # the layout table alone names more: the pattern still finds them
    missing = sorted(f"{page}: {path}" for page, paths in named.items() for path in paths
                     if not os.path.exists(os.path.join(REPOSITORY, path)))
    assert not missing, missing

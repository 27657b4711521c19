"""The library (what ``nnUNetv2_train -tr`` imports) stands apart from the tools."""
import ast
import os

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

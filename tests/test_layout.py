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


#: what the converters may use of the other tools: the checks of inputs and the running of commands
CONVERTERS_MAY_IMPORT = ("nnunetv2_csa.tools.inputs", "nnunetv2_csa.tools.commands")


def test_the_converters_import_no_other_tool_than_the_shared_input_and_command_helpers():
    # the converters sit below the tools that use them (the demo, the phantom generator whose marker they
    # read, the benchmark), never above them
    folder = os.path.join(os.path.dirname(PACKAGE), "dataset_conversion")
    offenders = {name: sorted(m for m in _imported_modules(os.path.join(folder, name))
                              if (m == "nnunetv2_csa.tools" or m.startswith("nnunetv2_csa.tools."))
                              and not any(m == a or m.startswith(a + ".") for a in CONVERTERS_MAY_IMPORT))
                 for name in os.listdir(folder) if name.endswith(".py")}
    assert len(offenders) > 5 and {name: tools for name, tools in offenders.items() if tools} == {}


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


def _pages() -> list[str]:
    return ["README.md"] + sorted(os.path.join("documentation", f)
                                  for f in os.listdir(os.path.join(REPOSITORY, "documentation")) if f.endswith(".md"))


def test_every_file_the_readme_and_the_documentation_name_or_link_exists():
    named = {page: _named_paths(open(os.path.join(REPOSITORY, page)).read()) for page in _pages()}
    # the layout page's table alone names more: the pattern still finds them
    assert len(named[os.path.join("documentation", "layout.md")]) > 20
    missing = sorted(f"{page}: {path}" for page, paths in named.items() for path in paths
                     if not os.path.exists(os.path.join(REPOSITORY, path)))
    for page in _pages():
        for link in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", open(os.path.join(REPOSITORY, page)).read()):
            if not re.match(r"https?://", link) and not os.path.exists(os.path.join(REPOSITORY, os.path.dirname(page),
                                                                                     link)):
                missing.append(f"{page}: link {link}")
    assert not missing, missing


_RUN_BY = re.compile(r"# run by ((?:\.ci/run|tests/\w+\.py)(?:(?:,| and) (?:\.ci/run|tests/\w+\.py))*)")


def _bash_blocks(markdown: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", markdown, re.S)


def block_is_run_or_marked(block: str, page: str) -> str | None:
    """None, or why the block breaks the rule: a page's shell block starts with ``# run by FILE``
    (files of the tests that run it; each console command of the block occurs in one of them, or
    one of them reads the page itself) or ``# not run by the tests: WHY``."""
    first = block.splitlines()[0] if block.strip() else ""
    if first.startswith("# not run by the tests:") and len(first) > len("# not run by the tests:") + 5:
        return None
    marked = _RUN_BY.match(first)
    if not marked:
        return f"starts with neither '# run by tests/...' nor '# not run by the tests: why': {first!r}"
    files = re.findall(r"\.ci/run|tests/\w+\.py", marked.group(1))
    absent = [f for f in files if not os.path.exists(os.path.join(REPOSITORY, f))]
    if absent:
        return f"names test files that do not exist: {absent}"
    texts = "\n".join(open(os.path.join(REPOSITORY, f)).read() for f in files)
    if os.path.basename(page) in texts:
        return None
    commands = set(re.findall(r"\bnnUNetv2_\w+", block))
    unrun = sorted(c for c in commands if c not in texts)
    return f"runs {unrun}, which {files} never name" if unrun else None


def test_every_command_block_of_the_readme_and_the_documentation_is_run_by_a_test_or_marked_not_run():
    broken = [f"{page}: {why}" for page in _pages() for block in _bash_blocks(open(os.path.join(REPOSITORY, page)).read())
              for why in [block_is_run_or_marked(block, page)] if why]
    assert not broken, broken


def test_the_block_rule_refuses_an_unmarked_block_and_a_command_its_test_never_runs():
    assert "starts with neither" in block_is_run_or_marked("nnUNetv2_train 1 2d 0\n", "README.md")
    assert "never name" in block_is_run_or_marked("# run by tests/test_rows.py\nnnUNetv2_csa_evaluate -pred x\n",
                                                  "documentation/x.md")
    assert "do not exist" in block_is_run_or_marked("# run by tests/test_nothing.py\nls\n", "README.md")
    assert block_is_run_or_marked("# not run by the tests: needs a GPU\nnnUNetv2_train\n", "README.md") is None

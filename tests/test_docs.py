"""The manual's generated references cannot drift from the code: every field of the training config (the sparse
methods' sections included), of the evaluation config and of the sweep file, every command and flag of the CLI,
and every public module of the packages the API pages cover are in what docs/hooks/reference.py generates, found
here by walking the code independently of it. (`mkdocs build --strict`, which .ci/run runs, checks the pages,
their links and the API pages' docstrings.)"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import re
import sys
import typing
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


reference = _load("docs_reference", REPO / "docs" / "hooks" / "reference.py")


def _flatten(data: dict, prefix: str = "") -> set[str]:
    """Dotted keys of the leaves of a nested dict (an empty dict, such as model.kwargs, is a leaf)."""
    keys = set()
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        keys |= _flatten(value, dotted) if isinstance(value, dict) and value else {dotted}
    return keys


def _dataclass_keys(cls: type, prefix: str = "") -> set[str]:
    """Dotted keys of a dataclass by its fields: nested dataclasses recursed into, an ``inline`` field's entries
    (the sparse methods' sections) at its level, fields the program derives (``derived``) left out."""
    hints = typing.get_type_hints(cls)
    keys = set()
    for field in dataclasses.fields(cls):
        if field.metadata.get("derived"):
            continue
        if "inline" in field.metadata:
            for name, kind in field.metadata["inline"]().items():
                keys |= _dataclass_keys(kind, f"{prefix}.{name}" if prefix else name)
            continue
        dotted = f"{prefix}.{field.name}" if prefix else field.name
        annotation = hints[field.name]
        keys |= _dataclass_keys(annotation, dotted) if dataclasses.is_dataclass(annotation) else {dotted}
    return keys


def _rows(markdown: str) -> dict[str, str]:
    """The generated tables' rows by their key (first cell)."""
    return {match.group(1): line for line in markdown.splitlines()
            if (match := re.match(r"^\| `([^`]+)` \|", line))}


def test_every_training_config_field_is_in_the_generated_reference():
    from robust_sparse.config import load_config
    from robust_sparse.config.parsing import to_dict
    from robust_sparse.config.schema import TrainConfig

    rows = _rows(reference.config_reference())
    written = _flatten(to_dict(load_config(None)))  # what a saved config holds: every key, every method's section
    fields = _dataclass_keys(TrainConfig)
    assert written and fields and len(fields) >= 100
    missing = sorted((written | fields) - set(rows))
    assert not missing, f"fields missing from the configuration reference: {missing}"
    # every registered sparse method with settings has its section there
    from robust_sparse.config.sparsity import sparse_methods

    sections = {name for name, record in sparse_methods().entries() if record.section is not None}
    assert sections and all(f"## `sparsity.{name}`" in reference.config_reference() for name in sections)


def _source_comments(cls: type) -> dict[str, str]:
    """A field's comment on its own line, read with a regular expression (the generator uses tokenize)."""
    found = {}
    for line in inspect.getsource(cls).splitlines():
        match = re.match(r"^\s+(\w+): [^=]+=.*?  # (.+)$", line)
        if match and '"' not in line.split("#")[-1]:
            found[match.group(1)] = match.group(2).strip()
    return found


def _sections(cls: type, prefix: str = ""):
    """(prefix, dataclass) for ``cls`` and every dataclass nested in it."""
    yield prefix, cls
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[field.name]):
            yield from _sections(hints[field.name], f"{prefix}.{field.name}" if prefix else field.name)


def test_the_reference_carries_each_fields_comment_and_default():
    from robust_sparse.config.schema import TrainConfig

    rows = _rows(reference.config_reference())
    checked = 0
    for prefix, cls in _sections(TrainConfig):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for name, comment in _source_comments(cls).items():
            if name not in fields or "inline" in fields[name].metadata:
                continue
            key = f"{prefix}.{name}" if prefix else name
            row = rows[key]
            assert comment[:40].replace("|", "\\|").replace("<", "&lt;") in row, (key, comment, row)
            default = reference.default_of(fields[name])
            assert f"| `{reference.spell(default)}` |" in row, (key, row)
            checked += 1
    assert checked >= 30


def test_every_evaluation_config_field_is_in_its_reference():
    from robust_sparse.eval.config import EvalConfig

    rows = _rows(reference.eval_config_reference())
    missing = sorted(_dataclass_keys(EvalConfig) - set(rows))
    assert len(rows) >= 20 and not missing, missing


def test_every_sweep_file_key_is_in_its_reference():
    from robust_sparse.studies import sweep

    rows = _rows(reference.sweep_reference())
    keys = _dataclass_keys(typing.get_type_hints(sweep.read_sweep_file)["return"])
    file_keys = set(getattr(sweep, "FILE_KEYS", ())) or {key.split(".")[0] for key in keys}
    assert {"base", "grid", "out_dir", "eval"} <= file_keys
    missing = sorted((keys | file_keys) - set(rows) - {key for key in file_keys if any(
        row.startswith(key + ".") for row in rows)})
    assert not missing, missing


def test_every_command_and_flag_is_in_the_cli_reference():
    from robust_sparse.cli import build_parser

    text = reference.cli_reference()
    parser = build_parser()
    (subparsers,) = [action for action in parser._actions if action.__class__.__name__ == "_SubParsersAction"]
    assert len(subparsers.choices) >= 6
    for name, command in subparsers.choices.items():
        heading = f"## `robust-sparse {name}`"
        assert heading in text, f"`robust-sparse {name}` is missing from the CLI reference"
        body = text.split(heading, 1)[1].split("\n## ", 1)[0]
        for action in command._actions:
            for option in set(action.option_strings) - {"-h", "--help"}:
                assert f"`{option}" in body, f"robust-sparse {name} {option} is missing from the CLI reference"
    for action in parser._actions:
        for option in action.option_strings:
            assert option in ("-h", "--help") or f"`{option}" in text


def test_every_registered_dataset_is_in_the_datasets_table():
    from robust_sparse.datasets import DATASETS

    text = reference.datasets_reference()
    names = [name for name, _ in DATASETS.entries()]
    assert len(names) >= 6 and all(f"| `{name}` |" in text for name in names)
    assert "linf: 8/255, 10,000" in text.split("| `cifar10` |")[1].split("\n")[0]


def test_every_exit_code_is_in_the_troubleshooting_table():
    from robust_sparse.errors import ExitCode

    text = reference.exit_codes_reference()
    for member in ExitCode:
        assert f"| {int(member)} | `{member.name}` |" in text


def _modules_in(folder: Path, package: str) -> set[str]:
    return {f"{package}.{path.stem}" for path in folder.glob("*.py") if not path.stem.startswith("_")}


@pytest.mark.parametrize("package, folder", [("robust_sparse.attacks", "attacks"), ("robust_sparse.eval", "eval"),
                                             ("robust_sparse.studies", "robust_sparse/studies"),
                                             ("robust_sparse.deploy", "robust_sparse/deploy"),
                                             ("robust_sparse.sparse", "robust_sparse/sparse")])
def test_every_module_of_the_documented_packages_has_an_api_section(package, folder):
    pages = reference.api_pages()
    modules = _modules_in(REPO / folder, package)
    assert modules and package in pages
    missing = sorted(modules - set(pages))
    assert not missing, f"modules without an API section: {missing}"
    text = reference.api_reference(package)
    assert all(f"::: {module}\n" in text for module in modules)


def test_every_name_of_import_robust_sparse_is_documented():
    import robust_sparse

    pages = reference.api_pages()
    undocumented = sorted(name for name, module in robust_sparse._EXPORTS.items() if module not in pages)
    assert not undocumented, f"robust_sparse names whose module no API page documents: {undocumented}"


def test_the_generated_pages_hold_their_markers_and_mkdocs_runs_the_hook():
    import yaml

    config = yaml.safe_load((REPO / "mkdocs.yml").read_text())
    assert "docs/hooks/reference.py" in config["hooks"]
    for page, marker in [("reference/configuration.md", "config"), ("reference/cli.md", "cli"),
                         ("reference/evaluation-config.md", "eval-config"), ("reference/sweep-file.md", "sweep"),
                         ("troubleshooting.md", "exit-codes"), ("benchmarks.md", "include BENCHMARKS.md"),
                         ("architecture.md", "layout"), ("training/data-and-models.md", "datasets")]:
        assert f"<!-- reference:{marker} -->" in (REPO / "docs" / page).read_text(), page


def test_the_module_map_names_every_module_of_the_package():
    text = reference.layout_reference()
    root = REPO / "robust_sparse"
    modules = {".".join(path.relative_to(REPO).with_suffix("").parts) for path in root.rglob("*.py")
               if not any(part.startswith("_") for part in path.relative_to(root).parts)}
    modules |= {f"robust_sparse.{folder}.{path.stem}" for folder in ("attacks", "eval")
                for path in (REPO / folder).glob("*.py") if not path.stem.startswith("_")}
    missing = sorted(module for module in modules if f"| `{module}` |" not in text)
    assert len(modules) > 50 and not missing, missing


def test_the_manual_says_why_attacks_and_eval_live_in_other_folders():
    text = (REPO / "docs" / "architecture.md").read_text()
    assert "`robust_sparse.attacks`" in text and "`robust_sparse.eval`" in text and "site-packages" in text


def navigation_pages(entries=None):
    """Every page file mkdocs.yml's navigation lists, sections walked."""
    if entries is None:
        import yaml

        entries = yaml.safe_load((REPO / "mkdocs.yml").read_text())["nav"]
    for entry in entries:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        yield from navigation_pages(value) if isinstance(value, list) else [value]


def test_every_page_of_the_manual_is_in_the_navigation():
    listed = set(navigation_pages())
    docs = REPO / "docs"
    written = {str(path.relative_to(docs)) for path in docs.rglob("*.md")
               if path.parent.parent != docs / "studies" and "hooks" not in path.parts}
    assert not sorted(written - listed), sorted(written - listed)
    assert not sorted(page for page in listed if not (docs / page).is_file())

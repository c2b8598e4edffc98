"""Generated pages of the manual, read from the code when the site is built, so that none can drift from it.

MkDocs loads this file as a hook (``hooks:`` in mkdocs.yml): :func:`on_page_markdown` replaces each marker line
``<!-- reference:KIND [ARGUMENT] -->`` of a page with what :data:`GENERATORS` (or ``api``/``include``) makes of it:

* ``config``: the training configuration, walked from ``robust_sparse.config.schema.TrainConfig`` (every nested
  section, and the sparse methods' sections, ``sparsity.<method>.*``, as the config parser finds them: the
  ``inline`` metadata of ``SparsityConfig.sections``), with the registered methods' defaults;
* ``eval-config`` and ``sweep``: ``robust-sparse eval --config``'s ``EvalConfig`` and the sweep file's dataclass
  (what ``read_sweep_file`` returns);
* ``cli``: every command of ``robust_sparse.cli.build_parser``, its usage and arguments;
* ``exit-codes``, ``datasets``, ``layout``, ``api-exports``: the ``ExitCode`` enum, the dataset records, every
  module with its docstring's first paragraph, ``import robust_sparse``'s lazy names;
* ``api PACKAGE[,MODULE...]``: mkdocstrings directives for a package's modules, found in its folder;
* ``include FILE``: a Markdown file of the repository's root (BENCHMARKS.md).

Nothing here lists a field, a method, a dataset or a command. A field's documentation is the comment written beside
it in the source (the ``# ...`` on its line, and a comment block directly above it); a section's is its class
docstring. ``tests/test_docs.py`` imports this module by path and checks, walking the code on its own, that every
field, command, dataset and module is in what it generates.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import enum
import functools
import importlib
import importlib.util
import inspect
import io
import os
import pkgutil
import re
import textwrap
import tokenize
import types
import typing
from typing import Any, Iterator



# ------------------------------------------------------------------------------------------------------------------
# reading a dataclass: its fields, their comments, types and defaults


@functools.lru_cache(maxsize=None)
def field_comments(cls: type) -> dict[str, str]:
    """Field name -> the comment that documents it in ``cls``'s source: a comment block directly above the field
    (a note on it, or on the group it opens) and the comment on its own line, joined by an em dash."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    lines = source.splitlines()
    comments: dict[int, str] = {}  # 1-based line -> comment text
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
    (node,) = ast.parse(source).body
    found: dict[str, str] = {}
    for statement in node.body:
        if not (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)):
            continue
        above: list[str] = []
        line = statement.lineno - 1
        while line >= 1 and lines[line - 1].strip().startswith("#"):
            above.insert(0, comments.get(line, ""))
            line -= 1
        inline = " ".join(comments[n] for n in range(statement.lineno, statement.end_lineno + 1) if n in comments
                          and not lines[n - 1].strip().startswith("#"))
        text = " — ".join(part for part in (" ".join(above).strip(), inline.strip()) if part)
        found[statement.target.id] = text.replace("noqa: F401", "").strip()
    return found


@functools.lru_cache(maxsize=None)
def member_comments(kind: type) -> dict[str, str]:
    """An Enum's value -> the comment beside its member (``GLOBAL = "global"  # ...``)."""
    by_name = field_comments_of_assignments(kind)
    return {member.value: by_name.get(name, "") for name, member in kind.__members__.items()}


def field_comments_of_assignments(cls: type) -> dict[str, str]:
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    comments = {token.start[0]: token.string.lstrip("#").strip()
                for token in tokenize.generate_tokens(io.StringIO(source).readline) if token.type == tokenize.COMMENT}
    lines = source.splitlines()
    (node,) = ast.parse(source).body
    found = {}
    for statement in node.body:
        if isinstance(statement, ast.Assign) and len(statement.targets) == 1 and isinstance(statement.targets[0],
                                                                                           ast.Name):
            above, line = [], statement.lineno - 1
            while line >= 1 and lines[line - 1].strip().startswith("#"):
                above.insert(0, comments.get(line, ""))
                line -= 1
            inline = comments.get(statement.end_lineno, "") if not lines[statement.end_lineno - 1].strip().startswith(
                "#") else ""
            found[statement.targets[0].id] = " ".join(part for part in (" ".join(above), inline) if part)
    return found


def _is_section(annotation: Any) -> bool:
    return dataclasses.is_dataclass(annotation) and isinstance(annotation, type)


def _enum_of(annotation: Any) -> type | None:
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for option in typing.get_args(annotation):
            if isinstance(option, type) and issubclass(option, enum.Enum):
                return option
    return None


def type_name(annotation: Any) -> str:
    """``int or None``, ``list[float]``, an Enum as ``str`` (its values are listed apart)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(option) for option in typing.get_args(annotation))
    if origin is not None:
        arguments = ", ".join(type_name(argument) for argument in typing.get_args(annotation))
        return f"{getattr(origin, '__name__', str(origin))}[{arguments}]"
    if annotation is type(None):
        return "None"
    if annotation is typing.Any:
        return "Any"
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return "str"
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def spell(value: Any) -> str:
    """A default as a YAML file would hold it."""
    if isinstance(value, enum.Enum):
        return spell(value.value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(spell(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key}: {spell(item)}" for key, item in value.items()) + "}"
    if isinstance(value, str):
        return value if value else "''"
    return repr(value)


def default_of(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return field.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


@dataclasses.dataclass
class Row:
    """One field of a section: its dotted key, type, default and documentation."""

    key: str
    type: str
    default: str
    doc: str
    choices: dict[str, str]


@dataclasses.dataclass
class Section:
    """A dataclass at a dotted prefix: its docstring and its plain fields (nested sections come apart)."""

    prefix: str
    cls: type
    doc: str
    rows: list[Row]


def _docstring(cls: type) -> str:
    doc = cls.__dict__.get("__doc__") or ""
    if doc.startswith(f"{cls.__name__}("):  # the signature dataclasses writes when there is none
        return ""
    return _markdown(inspect.cleandoc(doc))


def _markdown(text: str) -> str:
    """reStructuredText's inline markup as Markdown: ``x`` and :role:`x` become `x`."""
    text = re.sub(r":\w+:`~?([^`]+)`", r"`\1`", text)
    return text.replace("``", "`")


def walk(cls: type, prefix: str = "", *, instance: Any = None) -> Iterator[Section]:
    """Every section of ``cls`` depth first: ``cls`` itself (its plain fields), then each nested dataclass field,
    then the entries of an ``inline`` field (the sparse methods' sections), as the config parser reads them."""
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    rows, nested, inline = [], [], []
    for field in dataclasses.fields(cls):
        if field.metadata.get("derived"):  # filled by the program, never read from a file
            continue
        key = f"{prefix}.{field.name}" if prefix else field.name
        annotation = hints[field.name]
        if "inline" in field.metadata:
            inline.append(field)
            continue
        if _is_section(annotation):
            nested.append((key, annotation))
            continue
        default = default_of(field)
        kind = _enum_of(annotation)
        rows.append(Row(key, type_name(annotation), "(required)" if default is dataclasses.MISSING else spell(default),
                        comments.get(field.name, ""), member_comments(kind) if kind else {}))
    yield Section(prefix, cls, _docstring(cls), rows)
    for key, annotation in nested:
        yield from walk(annotation, key)
    for field in inline:
        for name, kind in field.metadata["inline"]().items():
            yield from walk(kind, f"{prefix}.{name}" if prefix else name)


def field_keys(cls: type) -> list[str]:
    """Every dotted key of ``cls``, sections' fields included, in the reference's order."""
    return [row.key for section in walk(cls) for row in section.rows]


# ------------------------------------------------------------------------------------------------------------------
# Markdown


def _cell(text: str) -> str:
    """Text for a table cell: pipes escaped, and ``<`` outside code spans too (``<class>`` is no HTML tag)."""
    parts = re.split(r"(`[^`]*`)", text.replace("\n", " "))
    escaped = "".join(part if part.startswith("`") else part.replace("<br>", "\0").replace("<", "&lt;")
                      .replace("\0", "<br>") for part in parts)
    return escaped.replace("|", "\\|").strip()


def _code(text: str) -> str:
    return f"`{text}`" if "`" not in text else f"`` {text} ``"


def section_markdown(section: Section, level: int = 2, title: str | None = None) -> str:
    heading = title or (f"`{section.prefix}`" if section.prefix else "Top level")
    parts = [f"{'#' * level} {heading}", ""]
    if section.doc:
        parts += [section.doc, ""]
    parts += [f"*{section.cls.__module__}.{section.cls.__qualname__}*", ""]
    if not section.rows:
        parts += ["No fields of its own: its settings are in the sections below.", ""]
        return "\n".join(parts)
    parts += ["| key | type | default | what it is |", "|---|---|---|---|"]
    for row in section.rows:
        doc = row.doc
        if row.choices:
            choices = "; ".join(f"`{value}`" + (f": {comment}" if comment else "")
                                for value, comment in row.choices.items())
            doc = f"{doc}<br>One of: {choices}." if doc else f"One of: {choices}."
        parts.append(f"| {_code(row.key)} | {_code(row.type)} | {_code(row.default)} | {_cell(doc)} |")
    parts.append("")
    return "\n".join(parts)


def _method_table() -> str:
    """The registered sparse methods: the shared fields they resolve, the optimizer they pair with."""
    try:
        from robust_sparse.config.sparsity import sparse_methods

        entries = list(sparse_methods().entries())
    except Exception as error:  # noqa: BLE001  (the reference still builds; the table says why it is missing)
        return f"*(the method registry could not be read: {error})*\n"
    lines = ["| `sparsity.method` | its section | shared fields it resolves when left at null | optimizer when "
             "`optim.optimizer` is not given | allocations it brings |", "|---|---|---|---|---|"]
    for name, record in entries:
        defaults = ", ".join(f"`{key}: {spell(value)}`" for key, value in getattr(record, "defaults", {}).items())
        section = f"[`sparsity.{name}`](#sparsity{name})" if getattr(record, "section", None) else "–"
        optimizer = f"`{record.optimizer}`" if getattr(record, "optimizer", None) else "–"
        allocations = ", ".join(f"`{key}`" for key in getattr(record, "distributions", {})) or "–"
        lines.append(f"| `{name}` | {section} | {defaults or '–'} | {optimizer} | {allocations} |")
    return "\n".join(lines) + "\n"


def _older_names() -> str:
    try:
        from robust_sparse.config import sparsity
    except Exception:  # noqa: BLE001
        return ""
    flat = getattr(sparsity, "FLAT_SPARSITY_NAMES", {})
    renamed = getattr(sparsity, "RENAMED_SECTION_FIELDS", {})
    if not flat and not renamed:
        return ""
    lines = ["Names of earlier versions, still read from YAML files, `--set` and saved checkpoints and translated "
             "as they are read:", "", "| earlier name | read as |", "|---|---|"]
    lines += [f"| `sparsity.{old}` | `sparsity.{section}.{new}` |" for old, (section, new) in flat.items()]
    lines += [f"| `sparsity.{section}.{old}` | `sparsity.{section}.{new}` |" for (section, old), new in renamed.items()]
    return "\n".join(lines) + "\n"


def config_reference() -> str:
    """The training configuration (``robust-sparse train CONFIG.yaml``, ``--set key.sub=value``): every section
    and field of :class:`TrainConfig`, the sparse methods' sections included."""
    from robust_sparse.config.schema import TrainConfig

    parts = []
    for section in walk(TrainConfig):
        parts.append(section_markdown(section))
        if section.prefix == "sparsity":
            parts += ["### Registered methods", "", _method_table(), _older_names()]
    return "\n".join(parts)


def eval_config_reference() -> str:
    """``robust-sparse eval --config FILE.yaml``: the fields of :class:`EvalConfig`."""
    from robust_sparse.eval.config import EvalConfig

    return "\n".join(section_markdown(section, title=None if section.prefix else "Evaluation config")
                     for section in walk(EvalConfig))


def sweep_file_type(module: Any = None) -> type:
    """The dataclass a sweep file is read into: what ``read_sweep_file`` returns."""
    module = module or importlib.import_module("robust_sparse.studies.sweep")
    return typing.get_type_hints(module.read_sweep_file)["return"]


def sweep_reference() -> str:
    """The sweep file (``robust-sparse sweep SWEEP.yaml``): the fields of the sweep's dataclass."""
    module = importlib.import_module("robust_sparse.studies.sweep")
    parts = []
    for section in walk(sweep_file_type(module)):
        parts.append(section_markdown(section, title=None if section.prefix else "Sweep file"))
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------------------------------
# the command line


def parser() -> argparse.ArgumentParser:
    from robust_sparse.cli import build_parser

    return build_parser()


def subcommands(root: argparse.ArgumentParser | None = None) -> dict[str, argparse.ArgumentParser]:
    root = root or parser()
    for action in root._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _help_text(command: argparse.ArgumentParser, action: argparse.Action) -> str:
    if not action.help or action.help == argparse.SUPPRESS:
        return ""
    return command._get_formatter()._expand_help(action)


def _argument(action: argparse.Action) -> str:
    if not action.option_strings:
        name = action.metavar or action.dest
        return f"`{name.upper() if name == action.dest else name}`" + (" ..." if action.nargs in ("+", "*") else "")
    metavar = ""
    if action.nargs != 0:
        metavar = " " + (action.metavar if isinstance(action.metavar, str) else action.dest.upper())
    return ", ".join(f"`{option}{metavar}`" for option in action.option_strings)


def command_markdown(name: str, command: argparse.ArgumentParser, summary: str) -> str:
    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"
    try:
        usage = command.format_usage().removeprefix("usage: ").strip()
    finally:
        if previous is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = previous
    parts = [f"## `robust-sparse {name}`", ""]
    if summary:
        parts += [summary[0].upper() + summary[1:] + ("" if summary.endswith(".") else "."), ""]
    if command.description and command.description != summary:
        parts += [command.description, ""]
    parts += ["```text", usage, "```", "", "| argument | default | what it does |", "|---|---|---|"]
    for action in command._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        default = action.default
        shown = "" if default in (None, False, [], argparse.SUPPRESS) else f"`{spell(default)}`"
        text = _help_text(command, action)
        if action.choices and not isinstance(action, argparse._SubParsersAction):
            text += f" (one of: {', '.join(f'`{choice}`' for choice in action.choices)})"
        if action.required and action.option_strings:
            text = "required; " + text
        parts.append(f"| {_argument(action)} | {shown} | {_cell(text)} |")
    parts.append("")
    return "\n".join(parts)


def cli_reference() -> str:
    """Every subcommand of ``robust-sparse``: its usage and every argument with its default and help."""
    root = parser()
    helps = {}
    for action in root._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
    parts = ["## `robust-sparse`", "", root.description or "", "", "| option | what it does |", "|---|---|"]
    for action in root._actions:
        if action.option_strings and not isinstance(action, argparse._HelpAction):
            parts.append(f"| {_argument(action)} | {_cell(_help_text(root, action))} |")
    parts += ["", "| command | what it does |", "|---|---|"]
    commands = subcommands(root)
    parts += [f"| [`{name}`](#robust-sparse-{name}) | {_cell(helps.get(name, ''))} |" for name in commands]
    parts.append("")
    for name, command in commands.items():
        parts.append(command_markdown(name, command, helps.get(name, "")))
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------------------------------
# the API pages: which modules a package holds, read from the package, so that a new module gets its section


def submodules(package: str) -> list[str]:
    """The modules of ``package`` (public ones: no leading underscore), in name order, found where it is installed
    (``robust_sparse.eval`` is the repository's eval/ folder, mapped into the package)."""
    spec = importlib.util.find_spec(package)  # without importing it: its folder is enough
    return [f"{package}.{info.name}" for info in sorted(pkgutil.iter_modules(spec.submodule_search_locations or []),
                                                       key=lambda i: i.name) if not info.name.startswith("_")]


def api_reference(target: str) -> str:
    """``PACKAGE``: the package's docstring, then every public module of it (mkdocstrings renders each);
    ``MODULE``: that module; ``a,b``: several."""
    parts = []
    for name in target.split(","):
        if importlib.util.find_spec(name).submodule_search_locations is not None:  # a package
            parts += [_directive(name, members=False)] + [_directive(sub) for sub in submodules(name)]
        else:
            parts.append(_directive(name))
    return "\n".join(parts)


def _directive(module: str, *, members: bool = True) -> str:
    lines = [f"::: {module}"] + ([] if members else ["    options:", "      members: false"])
    return "\n".join(lines) + "\n"


def exports_reference() -> str:
    """``import robust_sparse``'s public names (its lazy ``_EXPORTS`` table): each name and the module it comes
    from, linked to that module's API page where one documents it."""
    import robust_sparse

    exports = getattr(robust_sparse, "_EXPORTS", {})
    pages = api_pages()
    lines = ["| `robust_sparse.NAME` | defined in |", "|---|---|"]
    for name in sorted(exports):
        module = exports[name]
        where = f"[`{module}`]({pages[module]}#{module})" if module in pages else f"`{module}`"
        lines.append(f"| `{name}` | {where} |")
    return "\n".join(lines) + "\n"


def api_pages() -> dict[str, str]:
    """Module -> the API page (docs/api/*.md) whose ``reference:api`` marker documents it."""
    from pathlib import Path

    pages = {}
    for page in sorted((Path(__file__).resolve().parents[1] / "api").glob("*.md")):
        for match in _MARKER.finditer(page.read_text()):
            if match.group(1) != "api":
                continue
            for name in match.group(2).split(","):
                pages[name] = page.name
                if importlib.util.find_spec(name).submodule_search_locations is not None:
                    pages.update(dict.fromkeys(submodules(name), page.name))
    return pages


def _first_line(path: "os.PathLike[str] | str") -> str:
    """The first sentence-line of a module's docstring, read without importing it."""
    try:
        doc = ast.get_docstring(ast.parse(open(path, encoding="utf-8").read())) or ""
    except (OSError, SyntaxError):
        return ""
    return _markdown(doc.strip().split("\n\n")[0].replace("\n", " "))


def layout_reference() -> str:
    """Every module of the installed package, by folder, with the first paragraph of its docstring: the map of the
    code, read from the source (attacks/ and eval/ under the names they are installed as)."""
    from pathlib import Path

    spec = importlib.util.find_spec("robust_sparse")
    root = Path(spec.origin).parent
    repo = root.parent
    lines = ["| module | folder | what it is |", "|---|---|---|"]

    def rows(package: str, folder: Path) -> None:
        init = folder / "__init__.py"
        shown = folder.relative_to(repo) if folder.is_relative_to(repo) else folder
        lines.append(f"| `{package}` | `{shown}/` | {_cell(_first_line(init)) if init.is_file() else ''} |")
        for info in sorted(pkgutil.iter_modules([str(folder)]), key=lambda i: (i.ispkg, i.name)):
            if info.name.startswith("_"):
                continue
            name = f"{package}.{info.name}"
            if info.ispkg:
                continue
            lines.append(f"| `{name}` | | {_cell(_first_line(folder / (info.name + '.py')))} |")
        for info in sorted(pkgutil.iter_modules([str(folder)]), key=lambda i: i.name):
            if info.ispkg and not info.name.startswith("_"):
                sub = f"{package}.{info.name}"
                location = importlib.util.find_spec(sub).submodule_search_locations
                rows(sub, Path(list(location)[0]))

    rows("robust_sparse", root)
    for name in ("robust_sparse.attacks", "robust_sparse.eval"):  # mapped from other folders (package-dir)
        found = importlib.util.find_spec(name)
        if found is not None and found.submodule_search_locations and not any(
                line.startswith(f"| `{name}` |") for line in lines):
            rows(name, Path(list(found.submodule_search_locations)[0]))
    return "\n".join(lines) + "\n"


def datasets_reference() -> str:
    """The registered datasets (``data.dataset``), from their records: classes, shape, the evaluation protocol per
    threat model (radius and test points), corruptions, RobustBench's name."""
    try:
        from robust_sparse.datasets import DATASETS
    except ImportError:  # a version without dataset records
        return ""
    lines = ["| `data.dataset` | what | classes | input | protocol (eps, test points) | augmentation | "
             "corruptions | RobustBench |", "|---|---|---|---|---|---|---|---|"]
    for name, record in DATASETS.entries():
        classes = str(record.num_classes) if record.num_classes else "`data.num_classes`"
        size = f"{record.in_channels}×{record.image_size}×{record.image_size}"
        if getattr(record, "streamed", False):
            size += " (streamed; `data.image_size`)"
        protocols = "; ".join(f"{threat}: {spell_eps(protocol.eps)}, {protocol.n_examples:,}"
                              for threat, protocol in record.protocols.items())
        augmentation = ", ".join(part for part in (f"crop (pad {record.crop_padding})" if record.crop_padding else "",
                                                   "flip" if record.hflip else "") if part) or "none"
        corruptions = f"`{record.corruptions.folder}`" if record.corruptions else "–"
        lines.append(f"| `{name}` | {_cell(record.description)} | {classes} | {size} | {protocols} | {augmentation} "
                     f"| {corruptions} | {record.robustbench or '–'} |")
    return "\n".join(lines) + "\n"


def spell_eps(eps: float) -> str:
    """A radius as people write it: 8/255 rather than 0.0314 where it is a multiple of 1/255."""
    scaled = eps * 255
    if 0 < eps < 1 and abs(scaled - round(scaled)) < 1e-6:
        return f"{round(scaled)}/255"
    return f"{eps:g}"


def exit_codes_reference() -> str:
    """``robust-sparse``'s exit codes, from the ``ExitCode`` enum of robust_sparse/errors.py and its comments."""
    from robust_sparse import errors

    codes = getattr(errors, "ExitCode", None)
    if codes is None:
        return ""
    comments = field_comments_of_assignments(codes)
    lines = ["| exit code | name | meaning |", "|---:|---|---|"]
    for name, member in codes.__members__.items():
        lines.append(f"| {int(member)} | `{name}` | {_cell(comments.get(name, ''))} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------------------------
# the MkDocs hook

_MARKER = re.compile(r"^<!-- reference:([\w-]+)(?: ([\w.,]+))? -->$", flags=re.M)
GENERATORS = {"config": config_reference, "eval-config": eval_config_reference, "sweep": sweep_reference,
              "cli": cli_reference, "api-exports": exports_reference,
              "exit-codes": exit_codes_reference, "layout": layout_reference,
              "datasets": datasets_reference}


def expand(markdown: str) -> str:
    """Every marker line of ``markdown`` replaced by what it names."""

    def replace(match: re.Match) -> str:
        kind, argument = match.group(1), match.group(2)
        if kind == "api":
            return api_reference(argument)
        if kind == "include":
            return include(argument)
        return GENERATORS[kind]()

    return _MARKER.sub(replace, markdown)


def include(name: str) -> str:
    """A Markdown file of the repository's root (BENCHMARKS.md) as the body of a page at the docs' root: without its
    title, its links into docs/ made relative to the page."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / name).read_text()
    lines = text.splitlines()
    if lines and lines[0].startswith("# "):
        lines = lines[1:]
    return re.sub(r"\]\(docs/", "](", "\n".join(lines))


def on_page_markdown(markdown: str, page: Any = None, config: Any = None, files: Any = None) -> str:
    return expand(markdown)

"""The README and the manual (docs/) cannot drift from the program: every command they show names flags its command
has, every file they point into the repository exists, every error example prints exactly the line shown, what
runs in seconds (``--print-config``, ``--help``, a sweep's ``--dry-run``) runs, and the README stays a front page:
short, with exactly the two set-up commands (the second is what CI runs) and links that resolve.

Each check reads the page where its text lives: README.md for the front page, docs/*.md for the manual (the
studies' generated reports under docs/studies/*/ are checked by tests/test_long_work.py and the site build)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from robust_sparse.cli import build_parser, main

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()
#: the manual's hand-written pages: docs/**/*.md, less the generated study reports and the build's hooks
MANUAL = {str(path.relative_to(REPO)): path.read_text() for path in sorted((REPO / "docs").rglob("*.md"))
          if not (path.parent.parent == REPO / "docs" / "studies" or "hooks" in path.parts)}
PAGES = {"README.md": README, **MANUAL}
#: (page, language, body) of every fenced block
BLOCKS = [(page, language, body) for page, text in PAGES.items()
          for language, body in re.findall(r"```(\w*)\n(.*?)```", text, flags=re.S)]
README_LIMIT = 260  # lines: a front page (issue 34 asks for about 250)


def _command_lines(blocks) -> list[tuple[str, str]]:
    """(page, line) for every ``robust-sparse ...`` line of the shell blocks, continuation lines joined."""
    lines = []
    for page, language, body in blocks:
        if language not in ("bash", "sh", ""):
            continue
        body = body.replace("\\\n", " ")
        for line in body.splitlines():
            line = line.strip().removeprefix("$ ")
            line = re.sub(r"^(\S+=\S+\s+)+", "", line)  # OMP_NUM_THREADS=1 robust-sparse ...
            for part in re.split(r"&&|;|\|", line):
                part = part.strip().removeprefix(".venv/bin/")
                if part.startswith("robust-sparse "):
                    lines.append((page, part.split("  #")[0].split(" # ")[0].strip()))
    return lines


COMMANDS = _command_lines(BLOCKS)


def _subcommands() -> dict:
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return subparsers.choices


def _options(command: str) -> set[str]:
    return {option for action in _subcommands()[command]._actions for option in action.option_strings}


def test_the_readme_and_the_manual_show_commands():
    assert len(COMMANDS) > 20 and {line.split()[1] for _, line in COMMANDS} >= {"train", "eval", "export", "sweep",
                                                                                 "report", "doctor"}
    # the front page's tour: one training and one evaluation
    assert {line.split()[1] for page, line in COMMANDS if page == "README.md"} >= {"train", "eval"}


@pytest.mark.parametrize("page, line", COMMANDS, ids=[f"{page}: {line}" for page, line in COMMANDS])
def test_every_flag_shown_exists(page, line):
    words = line.split()
    command = words[1]
    assert command in _subcommands(), f"{page}: `{line}`: robust-sparse has no command {command!r}"
    known = _options(command)
    flags = {re.split(r"[=\[\]|]", word)[0] for word in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", line)}
    unknown = sorted(flag for flag in flags if flag not in known)
    assert not unknown, f"{page}: `{line}` uses {unknown}, which `robust-sparse {command}` does not have"


def _named_paths(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w./-])((?:configs|benchmarks|docs|tests|eval|attacks|robust_sparse)/[\w./-]+"
                          r"\.(?:yaml|py|md|csv|sh))", text))


@pytest.mark.parametrize("page", list(PAGES))
def test_every_repository_path_a_page_names_exists(page):
    named = _named_paths(PAGES[page])
    # robust_sparse.eval and robust_sparse.attacks are installed from the top-level eval/ and attacks/
    in_repo = {path: re.sub(r"^robust_sparse/(eval|attacks)/", r"\1/", path) for path in named}
    missing = sorted(path for path, found in in_repo.items() if not (REPO / found).exists())
    assert not missing, f"{page} names files that are not in the repository: {missing}"


def test_the_pages_name_repository_files():
    assert _named_paths(README) and sum(bool(_named_paths(text)) for text in MANUAL.values()) >= 5


def test_the_error_examples_print_exactly_their_line(capsys):
    examples = []
    for page, _language, body in BLOCKS:
        lines = body.strip().splitlines()
        if len(lines) == 2 and lines[0].startswith("$ robust-sparse ") and lines[1].startswith("robust-sparse: error:"):
            examples.append((page, shlex.split(lines[0].removeprefix("$ robust-sparse ")), lines[1]))
    assert {page for page, _, _ in examples} >= {"README.md", "docs/training/index.md"}
    for page, argv, expected in examples:
        assert main(argv) == 2, page
        assert capsys.readouterr().err.strip() == expected, page


@pytest.mark.parametrize("command", sorted({line.split()[1] for _, line in COMMANDS}))
def test_the_help_of_every_command_the_pages_use_runs(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0 and f"robust-sparse {command}" in capsys.readouterr().out


def test_print_config_runs_on_every_config_the_pages_name(capsys, tmp_path, monkeypatch):
    import yaml

    # (the studies' sweeps read data prepared for them: docs/studies/README.md's files are checked for existence by
    # tests/test_long_work.py)
    configs = sorted({config for page, text in PAGES.items() if not page.startswith("docs/studies/")
                      for config in re.findall(r"(?<![\w./-])(configs/[\w./-]+\.yaml)", text)})
    sweeps = {c for c in configs if {"grid", "base", "random"} & set(yaml.safe_load((REPO / c).read_text()) or {})}
    assert configs and len(sweeps) < len(configs)
    monkeypatch.chdir(tmp_path)  # a paper sweep reads data.root 'data': an empty folder passes the plan's check
    (tmp_path / "data").mkdir()
    for sweep in sorted(sweeps):  # a sweep file: its dry run plans without training anything
        assert main(["sweep", str(REPO / sweep), "--dry-run", "--out", str(tmp_path / Path(sweep).stem)]) == 0, sweep
        capsys.readouterr()
    for config in sorted(set(configs) - sweeps):
        assert main(["train", str(REPO / config), "--print-config"]) == 0, config
        assert "model:" in capsys.readouterr().out


def test_the_sweep_file_example_loads_and_has_the_runs_it_says(tmp_path, monkeypatch):
    from robust_sparse.studies.sweep import expand, load_sweep

    (body,) = [body for page, language, body in BLOCKS
               if page == "docs/sweeps.md" and language == "yaml" and body.startswith("# my_gamma_study.yaml")]
    # as the example says: saved in the repository's root, its base relative to it (a copy of the tree's part)
    (tmp_path / "configs").mkdir()
    base = re.search(r"^base: (\S+)", body, flags=re.M).group(1)
    (tmp_path / base).write_text((REPO / base).read_text())
    sweep_file = tmp_path / "my_gamma_study.yaml"
    sweep_file.write_text(body.replace("runs/my_gamma_study", str(tmp_path / "out")))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()  # the base config reads CIFAR-10 from data/: the plan only checks the folder
    runs = expand(load_sweep(sweep_file, None))
    assert len(runs) == 9 and ["agent.gamma=0.1", "seed=2"] in runs


# ------------------------------------------------------------------------------------------------------------------
# the front page


def _setup_commands() -> list[str]:
    section = README.split("## Set-up: two commands", 1)[1].split("\n## ", 1)[0]
    return [line.strip() for language, body in re.findall(r"```(\w*)\n(.*?)```", section, flags=re.S)
            if language in ("bash", "sh") for line in body.splitlines() if line.strip()]


def test_the_readme_has_exactly_the_two_set_up_commands_and_ci_runs_the_second():
    quickstart, tests = _setup_commands()  # exactly two: the quickstart and the test command
    assert quickstart == ("python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/robust-sparse doctor --fix"
                          " && .venv/bin/robust-sparse train")
    assert tests.startswith("python3 -m venv .venv && .venv/bin/pip install -e '.[dev]'")
    assert tests.endswith("&& .venv/bin/python -m pytest")
    ci = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line.strip()]
    assert ci[-1] == tests, ".ci/run's last line must be the README's test command"
    # and nowhere else does the README show a command that sets up a virtual environment or installs the project
    setups = [line for _, body in re.findall(r"```(\w*)\n(.*?)```", README, flags=re.S) for line in body.splitlines()
              if "-m venv" in line or re.search(r"pip install -e", line)]
    assert setups == [quickstart, tests]


def test_ci_builds_the_manual_strictly():
    ci = (REPO / ".ci" / "run").read_text()
    assert "pip install -e '.[dev,docs]'" in ci and "mkdocs build --strict" in ci


def test_the_readme_is_a_front_page():
    lines = README.count("\n") + (not README.endswith("\n"))
    assert lines <= README_LIMIT, f"README.md has {lines} lines: the manual (docs/) is the place for the rest"
    for heading in ("## Set-up: two commands", "## A 30-second tour", "## Documentation"):
        assert heading in README


def _slug(heading: str) -> str:
    """GitHub's and MkDocs' anchor of a heading (lower case, punctuation dropped, spaces as hyphens)."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"\s+", "-", re.sub(r"[^\w\s-]", "", text)).strip("-")


def _anchors(text: str) -> set[str]:
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    return {_slug(match) for match in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}


@pytest.mark.parametrize("page", ["README.md", "BENCHMARKS.md"])
def test_every_link_of_a_root_page_resolves(page):
    """README.md and BENCHMARKS.md are read on their own (GitHub, PyPI): their links go to files that exist and to
    headings those files have."""
    text = (REPO / page).read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", re.sub(r"```.*?```", "", text, flags=re.S))
    broken = []
    for link in links:
        if re.match(r"^[a-z]+://", link) or link.startswith("mailto:"):
            continue
        path, _, anchor = link.partition("#")
        target = (REPO / path) if path else REPO / page
        if not target.exists():
            broken.append(link)
        elif anchor and target.suffix == ".md" and anchor not in _anchors(target.read_text()):
            broken.append(link)
    assert page != "README.md" or len(links) >= 15
    assert not broken, f"{page} links to what does not exist: {broken}"


def test_the_readme_links_every_page_of_the_manual_it_is_the_front_of():
    """Every top-level page of the manual's navigation is one click from the front page."""
    from test_docs import navigation_pages

    linked = set(re.findall(r"\]\(docs/([^)#\s]+)", README))
    missing = sorted(page for page in navigation_pages() if page.endswith(".md") and page not in linked
                     and page not in ("index.md", "benchmarks.md") and not page.startswith("api/")
                     and page not in ("reference/evaluation-config.md", "reference/sweep-file.md"))
    assert not missing, f"README.md does not link these pages of the manual: {missing}"

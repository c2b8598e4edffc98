"""The README cannot drift from the program: every command it shows names flags its command has, every file it
points into the repository exists, every error example prints exactly the line shown, and what runs in seconds
(``--print-config``, ``--help``) runs."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from robust_sparse.cli import build_parser, main

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()
BLOCKS = re.findall(r"```(\w*)\n(.*?)```", README, flags=re.S)


def _command_lines() -> list[str]:
    """Every ``robust-sparse ...`` line of the README's shell blocks, continuation lines joined."""
    lines = []
    for language, body in BLOCKS:
        if language not in ("bash", "sh", ""):
            continue
        body = body.replace("\\\n", " ")
        for line in body.splitlines():
            line = line.strip().removeprefix("$ ")
            line = re.sub(r"^(\S+=\S+\s+)+", "", line)  # OMP_NUM_THREADS=1 robust-sparse ...
            for part in re.split(r"&&|;|\|", line):
                part = part.strip().removeprefix(".venv/bin/")
                if part.startswith("robust-sparse "):
                    lines.append(part.split("  #")[0].split(" # ")[0].strip())
    return lines


COMMANDS = _command_lines()


def _options(command: str) -> set[str]:
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return {option for action in subparsers.choices[command]._actions for option in action.option_strings}


def test_the_readme_shows_commands():
    assert len(COMMANDS) > 20 and {line.split()[1] for line in COMMANDS} >= {"train", "eval", "export", "sweep",
                                                                              "report", "doctor"}


@pytest.mark.parametrize("line", COMMANDS)
def test_every_flag_the_readme_shows_exists(line):
    words = line.split()
    command = words[1]
    known = _options(command)
    flags = {re.split(r"[=\[\]|]", word)[0] for word in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", line)}
    unknown = sorted(flag for flag in flags if flag not in known)
    assert not unknown, f"README: `{line}` uses {unknown}, which `robust-sparse {command}` does not have"


def test_every_repository_path_the_readme_names_exists():
    named = set(re.findall(r"(?<![\w./-])((?:configs|benchmarks|docs|tests|eval|attacks|robust_sparse)/[\w./-]+"
                           r"\.(?:yaml|py|md|csv|sh))", README))
    # robust_sparse.eval and robust_sparse.attacks are installed from the top-level eval/ and attacks/
    in_repo = {path: re.sub(r"^robust_sparse/(eval|attacks)/", r"\1/", path) for path in named}
    missing = sorted(path for path, found in in_repo.items() if not (REPO / found).exists())
    assert named and not missing, f"README names files that are not in the repository: {missing}"


def test_the_readme_error_examples_print_exactly_their_line(capsys):
    examples = []
    for _language, body in BLOCKS:
        lines = body.strip().splitlines()
        if len(lines) == 2 and lines[0].startswith("$ robust-sparse ") and lines[1].startswith("robust-sparse: error:"):
            examples.append((shlex.split(lines[0].removeprefix("$ robust-sparse ")), lines[1]))
    assert examples
    for argv, expected in examples:
        assert main(argv) == 2
        assert capsys.readouterr().err.strip() == expected


@pytest.mark.parametrize("command", ["train", "eval", "export", "sweep", "report", "doctor"])
def test_the_help_of_every_command_the_readme_uses_runs(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0 and f"robust-sparse {command}" in capsys.readouterr().out


def test_print_config_runs_on_every_config_the_readme_names(capsys, tmp_path, monkeypatch):
    import yaml

    configs = sorted(set(re.findall(r"(?<![\w./-])(configs/[\w./-]+\.yaml)", README)))
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


def test_the_readme_sweep_file_example_loads_and_has_the_runs_it_says(tmp_path, monkeypatch):
    from robust_sparse.studies.sweep import expand, load_sweep

    (body,) = [body for language, body in BLOCKS if language == "yaml" and body.startswith("# my_gamma_study.yaml")]
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

"""The package's import graph has no cycle and its layers point one way.

The graph is read from the source with :mod:`ast`: every ``import`` and ``from ... import``, at module level or
inside a function (a lazy import still ties the two modules together), relative imports resolved, and the folders
``attacks/`` and ``eval/`` under their installed names ``robust_sparse.attacks`` and ``robust_sparse.eval``.

The layers, lowest first (an arrow may only point down or sideways within a layer):

- ``attacks``: the attack implementations; they import nothing else of the project;
- core: every other module except the three below (training, config, sparse methods, models, kernels, files);
- ``eval``: evaluation of trained models;
- ``studies``: sweeps and their reports, which run training and evaluation;
- ``cli``: the command line, on top of everything.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# where each installed package's source lives (pyproject.toml's package-dir)
SOURCES = {"robust_sparse": REPO / "robust_sparse", "robust_sparse.attacks": REPO / "attacks",
           "robust_sparse.eval": REPO / "eval"}


def find_modules(sources: dict[str, Path]) -> dict[str, Path]:
    """Dotted module name -> source file, for every ``.py`` under each source folder."""
    modules = {}
    for package, folder in sources.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((package, *parts))] = path
    return modules


def imported_names(module: str, path: Path) -> list[tuple[str, int]]:
    """Every name ``path`` imports, with its line: ``import X`` gives ``X``, ``from X import y`` gives ``X.y``."""
    is_package = path.name == "__init__.py"
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: drop one trailing part per dot (a package's own name counts as the first)
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names += [(f"{base}.{alias.name}", node.lineno) for alias in node.names]
    return names


def import_graph(modules: dict[str, Path]) -> dict[str, dict[str, tuple[Path, int]]]:
    """module -> {imported project module: (file, line) of the first import}; ``X.y`` counts as ``X`` when ``y``
    is not a module (a name defined in ``X``)."""
    graph: dict[str, dict[str, tuple[Path, int]]] = {module: {} for module in modules}
    for module, path in modules.items():
        for name, line in imported_names(module, path):
            while name and name not in modules:  # X.y -> X, and X.y.z of a non-module -> X
                name = name.rpartition(".")[0]
            if name and name != module:
                graph[module].setdefault(name, (path, line))
    return graph


def cycles(graph: dict[str, dict]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def where(path: Path, line: int) -> str:
    return f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path}:{line}"


def chain(graph: dict[str, dict[str, tuple[Path, int]]], component: list[str]) -> list[str]:
    """One concrete cycle through the component's first module, each arrow with the file:line that makes it."""
    start, inside = component[0], set(component)
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier and start not in previous:  # breadth-first, so the chain shown is a shortest one
        following = []
        for node in frontier:
            for child in sorted(graph[node]):
                if child in inside and child not in previous:
                    previous[child] = node
                    following.append(child)
        frontier = following
    steps, node = [], start
    while True:
        parent = previous[node]
        path, line = graph[parent][node]
        steps.append(f"{parent} -> {node} ({where(path, line)})")
        node = parent
        if node == start:
            return steps[::-1]


def layer(module: str) -> str:
    """The layer of a module: attacks, core, eval, studies or cli (the module docstring lists them)."""
    for name in ("attacks", "eval", "studies"):
        if module == f"robust_sparse.{name}" or module.startswith(f"robust_sparse.{name}."):
            return name
    return "cli" if module == "robust_sparse.cli" else "core"


# what each layer may not import
FORBIDDEN = {"attacks": {"core", "eval", "studies", "cli"}, "core": {"eval", "studies", "cli"},
             "eval": {"studies", "cli"}, "studies": {"cli"}, "cli": set()}


def violations(graph: dict[str, dict[str, tuple[Path, int]]]) -> list[str]:
    return [f"{source} ({layer(source)}) -> {target} ({layer(target)}) at {where(path, line)}"
            for source, targets in sorted(graph.items()) for target, (path, line) in sorted(targets.items())
            if layer(target) in FORBIDDEN[layer(source)]]


def problems(sources: dict[str, Path]) -> list[str]:
    graph = import_graph(find_modules(sources))
    found = [f"import cycle among {', '.join(component)}:\n    " + "\n    ".join(chain(graph, component))
             for component in cycles(graph)]
    return found + [f"layering: {violation}" for violation in violations(graph)]


def test_no_import_cycles_and_layers_point_down():
    found = problems(SOURCES)
    assert not found, "\n".join(found)


def test_the_checker_sees_a_cycle_and_a_layering_violation(tmp_path):
    """A tiny package with a cycle (closed by a lazy relative import) and a core module importing eval."""
    package, eval_folder = tmp_path / "robust_sparse", tmp_path / "eval"
    (package / "config").mkdir(parents=True)
    eval_folder.mkdir()
    files = {
        package / "__init__.py": "",
        package / "config" / "__init__.py": "from .schema import Config\n",
        package / "config" / "schema.py": "from robust_sparse import sparse\n",
        package / "sparse.py": "def build():\n    from .config import Config\n",
        package / "train.py": "import os\nfrom robust_sparse.eval import runner\n",
        eval_folder / "__init__.py": "from .runner import evaluate\n",
        eval_folder / "runner.py": "from ..config import schema\n",  # eval -> core: allowed
    }
    for path, text in files.items():
        path.write_text(text)
    found = problems({"robust_sparse": package, "robust_sparse.eval": eval_folder})
    assert found == [
        "import cycle among robust_sparse.config, robust_sparse.config.schema, robust_sparse.sparse:\n"
        f"    robust_sparse.config -> robust_sparse.config.schema ({package / 'config' / '__init__.py'}:1)\n"
        f"    robust_sparse.config.schema -> robust_sparse.sparse ({package / 'config' / 'schema.py'}:1)\n"
        f"    robust_sparse.sparse -> robust_sparse.config ({package / 'sparse.py'}:2)",
        f"layering: robust_sparse.train (core) -> robust_sparse.eval.runner (eval) at {package / 'train.py'}:2",
    ]

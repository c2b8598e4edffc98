"""The one YAML reader of user input (config files, sweep files, ``--set`` values): ``yaml.SafeLoader`` with two
refusals on top. A key given twice in one mapping (YAML would silently keep the last) and aliases that expand to
more than :data:`MAX_EXPANDED_NODES` values (an "alias bomb": a few lines that become billions of list items
once anything walks them) are one-line errors naming what is wrong and where.
"""

from __future__ import annotations

from typing import Any

import yaml

from robust_sparse.errors import ConfigError

#: Values a document may hold once every alias is expanded; real configs and sweep files hold a few hundred.
MAX_EXPANDED_NODES = 100_000
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _Refusal(yaml.YAMLError):
    """Raised inside the loader; :func:`load_yaml` turns it into a ConfigError naming the source."""


class CheckedLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys and documents whose aliases expand past the cap."""

    def compose_document(self) -> yaml.Node:
        node = super().compose_document()
        _expanded_size(node, {}, set())
        return node

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            first_line: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == _MERGE_TAG:  # `<<: *base` keys may be overridden: that is what merging is for
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    earlier = first_line.get(key)
                    first_line.setdefault(key, line)
                except TypeError:  # an unhashable key: SafeLoader's own error follows
                    continue
                if earlier is not None:  # on another line or the same one (a flow mapping: {a: 1, a: 2})
                    where = f"line {earlier} and line {line}" if earlier != line else f"twice on line {line}"
                    raise _Refusal(f"duplicate key {key!r} ({where}); give each key once")
        return super().construct_mapping(node, deep=deep)


def _expanded_size(node: yaml.Node, sizes: dict[int, int], open_nodes: set[int]) -> int:
    """Values under ``node`` with every alias expanded, computed once per distinct node (so the count itself stays
    cheap however large it is); refused past the cap, and for an alias inside itself."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_nodes:
        raise _Refusal("an alias refers to the mapping or list that contains it (a recursive structure)")
    open_nodes.add(key)
    size = 1
    if isinstance(node, yaml.SequenceNode):
        size += sum(_expanded_size(child, sizes, open_nodes) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        size += sum(_expanded_size(k, sizes, open_nodes) + _expanded_size(v, sizes, open_nodes)
                    for k, v in node.value)
    open_nodes.discard(key)
    if size > MAX_EXPANDED_NODES:
        raise _Refusal(f"its aliases expand to more than {MAX_EXPANDED_NODES:,} values (an alias bomb?)")
    sizes[key] = size
    return size


_RAISE = object()


def load_yaml(text: str, source: str, *, if_invalid: Any = _RAISE) -> Any:
    """``text`` parsed safely; duplicate keys, alias bombs and syntax errors are one ConfigError naming ``source``
    (e.g. ``config file runs/a.yaml`` or ``--set optim.lr``). ``if_invalid``: returned instead of the syntax error
    (an override's value that is no YAML is its text)."""
    try:
        return yaml.load(text, Loader=CheckedLoader)  # noqa: S506 - CheckedLoader is a SafeLoader
    except _Refusal as error:
        raise ConfigError(f"{source}: {error}") from None
    except yaml.YAMLError as error:
        if if_invalid is not _RAISE:
            return if_invalid
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"{source} is not valid YAML{where}") from None

"""Which BatchNorm (and ReLU) follows which convolution: the chains that sparse kernels can fold into one call.

A chain is ``[conv, norm, relu or None]`` by module name: a convolution whose only consumer is a BatchNorm2d, and
the ReLU module that is that BatchNorm's only consumer, each module called once in the forward. The calls are
read from the graph ``torch.fx`` traces (``leaf`` says which modules are traced as calls rather than entered);
a model whose forward does not trace falls back to consecutive children of ``nn.Sequential`` containers, where
the order of calls is certain.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable, Optional

import torch.fx
from torch import nn

__all__ = ["chains"]


def chains(model: nn.Module, is_conv: Callable[[nn.Module], bool],
           leaf: Callable[[nn.Module], bool] = lambda module: False) -> list[list[Optional[str]]]:
    """The ``[conv, norm, relu or None]`` chains of ``model`` whose conv satisfies ``is_conv``."""

    class Tracer(torch.fx.Tracer):
        def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
            return leaf(module) or super().is_leaf_module(module, qualified_name)

    try:
        graph = Tracer().trace(model)
    except Exception:  # forward code fx cannot follow (data-dependent control flow): the containers only
        return _sequential_chains(model, is_conv)
    calls = [node for node in graph.nodes if node.op == "call_module"]
    sites = Counter(node.target for node in calls)

    def only_user(node: torch.fx.Node, kind: type) -> Optional[torch.fx.Node]:
        users = list(node.users)
        if len(users) == 1 and users[0].op == "call_module" and sites[users[0].target] == 1 \
                and isinstance(model.get_submodule(users[0].target), kind):
            return users[0]
        return None

    found = []
    for node in calls:
        if sites[node.target] == 1 and is_conv(model.get_submodule(node.target)):
            norm = only_user(node, nn.BatchNorm2d)
            if norm is not None:
                relu = only_user(norm, nn.ReLU)
                found.append([node.target, norm.target, None if relu is None else relu.target])
    return found


def _sequential_chains(model: nn.Module, is_conv: Callable[[nn.Module], bool]) -> list[list[Optional[str]]]:
    uses = Counter(id(module) for _, module in model.named_modules(remove_duplicate=False))
    names = {id(module): name for name, module in model.named_modules()}
    found = []
    for container in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        children = list(container)
        for i, conv in enumerate(children[:-1]):
            norm = children[i + 1]
            if is_conv(conv) and isinstance(norm, nn.BatchNorm2d) and uses[id(norm)] == 1:
                relu = children[i + 2] if i + 2 < len(children) else None
                relu = relu if isinstance(relu, nn.ReLU) and uses[id(relu)] == 1 else None
                found.append([names[id(conv)], names[id(norm)], None if relu is None else names[id(relu)]])
    return found

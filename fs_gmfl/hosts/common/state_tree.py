"""Nested method state <-> (a JSON-able tree, flat tensors): how both hosts persist a strategy's state.

The simulator's checkpoints and the FederatedScope host's ``.fs_gmfl.safetensors``
files store the tensors under the tree's flat keys and the tree as JSON.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def flatten_state(state: Any, prefix: str = "s") -> tuple[Any, dict[str, torch.Tensor]]:
    """Split a nested state into a JSON-able tree and flat tensors; the tree keeps key types and tuples."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(node: Any, path: str) -> Any:
        if isinstance(node, torch.Tensor):
            tensors[path] = node.detach().cpu().clone().contiguous()  # no shared storage
            return {"t": path}
        if isinstance(node, Mapping):
            return {"d": [[k, walk(v, f"{path}/{k}")] for k, v in node.items()]}
        if isinstance(node, (list, tuple)):
            return {"l" if isinstance(node, list) else "u": [walk(v, f"{path}/{i}") for i, v in enumerate(node)]}
        if node is None or isinstance(node, (bool, int, float, str)):
            return {"v": node}
        raise TypeError(f"cannot checkpoint a {type(node).__name__} at {path}")

    return walk(state, prefix), tensors


def unflatten_state(tree: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten_state`."""
    if "t" in tree:
        return tensors[tree["t"]]
    if "d" in tree:
        return {k: unflatten_state(v, tensors) for k, v in tree["d"]}
    if "l" in tree:
        return [unflatten_state(v, tensors) for v in tree["l"]]
    if "u" in tree:
        return tuple(unflatten_state(v, tensors) for v in tree["u"])
    return tree["v"]

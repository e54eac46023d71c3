"""A strategy's state beside FederatedScope's checkpoints, so ``federate.restore_from`` resumes the method too.

FederatedScope saves ``{'cur_round', 'model'}`` at ``federate.save_to`` (best),
``final_<save_to>`` and ``<round>_<save_to>`` (``save_freq``), and
``restore_from`` loads only the model. Next to each checkpoint ``<path>``
fs_gmfl writes ``<path>.fs_gmfl.safetensors``: every tensor of the
strategy's :meth:`~fs_gmfl.core.protocol.Strategy.state_dict` (GMFL masks and
statistics, HAFL importance EMAs, FedHFT cluster heads and memberships, ...)
under flat keys, with the method name, the round and the non-tensor state in
the file's metadata. FederatedScope's own checkpoint file is unchanged, so its
evaluation scripts and ``FSChatBot`` still load it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from fs_gmfl.errors import InputError
from fs_gmfl.hosts.common.state_tree import flatten_state, unflatten_state

SUFFIX = ".fs_gmfl.safetensors"
FORMAT_VERSION = 1
METADATA_KEY = "fs_gmfl"


def state_path(checkpoint: str | Path) -> Path:
    """Where the method state of FederatedScope checkpoint ``checkpoint`` lives."""
    return Path(str(checkpoint) + SUFFIX)


def save_method_state(checkpoint: str | Path, *, method: str, rnd: int, state: Any) -> Path:
    """Write the strategy ``state`` of round ``rnd`` beside ``checkpoint`` (atomically replaced)."""
    path = state_path(checkpoint)
    tree, tensors = flatten_state(state)
    meta = {"format": FORMAT_VERSION, "method": method, "round": int(rnd), "tree": tree}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(meta)})
    tmp.replace(path)
    return path


def load_method_state(checkpoint: str | Path, *, method: str) -> tuple[int, Any] | None:
    """``(round, strategy state)`` saved beside ``checkpoint``, or ``None`` when there is no such file.

    Raises:
        InputError: the file is unreadable, from another format, or from another method.
    """
    path = state_path(checkpoint)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = json.loads((fh.metadata() or {})[METADATA_KEY])
        tensors = load_file(str(path))
    except (SafetensorError, OSError, KeyError, ValueError) as err:
        raise InputError(f"method state {path} is unreadable: {err}") from None
    if meta.get("format") != FORMAT_VERSION:
        raise InputError(f"method state {path} has format {meta.get('format')!r}, expected {FORMAT_VERSION}")
    if meta.get("method") != method:
        raise InputError(f"method state {path} is of method '{meta.get('method')}', this run is '{method}'")
    return int(meta["round"]), unflatten_state(meta["tree"], tensors)

"""fs_gmfl messages and states as Flower records, without pickle.

A :class:`~fs_gmfl.core.message.Message` travels as two ``ArrayRecord``\\ s in
the Flower message's ``RecordDict``: ``"tensors"`` (model tensors) and
``"control"`` (masks, indices, seeds, the sample count). Each tensor is one
Flower ``Array`` whose ``dtype`` is the torch dtype's name (``bfloat16``
included), ``shape`` its shape, ``stype`` :data:`STYPE` and ``data`` the raw
element bytes: exact for every dtype, and decoded by
:func:`~fs_gmfl.hosts.common.tensor_wire.tensor_from_raw` after the same header
checks as the FederatedScope host (dtype, shape, the sample count's fixed
form, byte count), so a malformed or hostile record raises
:class:`~fs_gmfl.hosts.common.tensor_wire.WireError` before anything is used.
Numbers and text go in ``ConfigRecord``/``MetricRecord`` entries.

A client's persistent state (what a method keeps per client and what the
client's model holds between rounds) is stored in the node's
``context.state`` the same way: a nested state is flattened
(:func:`~fs_gmfl.hosts.common.state_tree.flatten_state`) into an
``ArrayRecord`` of tensors and a JSON tree in a ``ConfigRecord``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from torch import Tensor

from fs_gmfl.core.message import Message
from fs_gmfl.hosts.common.state_tree import flatten_state, unflatten_state
from fs_gmfl.hosts.common.tensor_wire import CONTROL_SPECS, WireError, check_header, dtype_name, raw_bytes, tensor_from_raw

#: the serialisation type of fs_gmfl's arrays: raw little-endian element bytes in C order.
STYPE = "fs_gmfl.raw/1"
TENSORS = "tensors"
CONTROL = "control"
#: the RecordDict entries a downlink or uplink may hold besides the two array records.
CONFIG = "config"
METRICS = "metrics"


def to_array(t: Tensor) -> Array:
    """One tensor as a Flower ``Array`` (exact dtype and bytes)."""
    return Array(dtype=dtype_name(t), shape=tuple(int(d) for d in t.shape), stype=STYPE, data=raw_bytes(t))


def from_array(array: Any, *, name: str, dtype: Any = None, shape: tuple[int, ...] | None = None) -> Tensor:
    """Inverse of :func:`to_array`, every field checked before a tensor is built."""
    if not isinstance(array, Array):
        raise WireError(f"'{name}' is not an array (got {type(array).__name__})")
    if array.stype != STYPE:
        raise WireError(f"'{name}' has serialisation type {str(array.stype)[:40]!r}, expected {STYPE!r}")
    if not isinstance(array.shape, (tuple, list)):
        raise WireError(f"'{name}' has a malformed shape")
    kind, expected = check_header(name, array.dtype, array.shape, dtype=dtype, shape=shape)
    if not isinstance(array.data, (bytes, bytearray)):
        raise WireError(f"'{name}' carries no bytes")
    return tensor_from_raw(bytes(array.data), kind, list(array.shape), expected, name=name)


def tensors_record(tensors: Mapping[str, Tensor]) -> ArrayRecord:
    """An ``ArrayRecord`` of :func:`to_array` per tensor, in the mapping's order."""
    return ArrayRecord(array_dict={key: to_array(t) for key, t in tensors.items()})


def tensors_of(record: Any, *, what: str, controls: bool = False) -> dict[str, Tensor]:
    """The tensors of an ``ArrayRecord`` (control entries with a fixed form checked against it)."""
    if not isinstance(record, ArrayRecord):
        raise WireError(f"'{what}' is not an array record (got {type(record).__name__})")
    out: dict[str, Tensor] = {}
    for key, array in record.items():
        if not isinstance(key, str):
            raise WireError(f"entry name {key!r} of '{what}' is not a string")
        dtype, shape = CONTROL_SPECS.get(key, (None, None)) if controls else (None, None)
        out[key] = from_array(array, name=f"{what}/{key}", dtype=dtype, shape=shape)
    return out


def message_content(message: Message, **records: Any) -> RecordDict:
    """The ``RecordDict`` of ``message`` plus the given config/metric records."""
    return RecordDict({TENSORS: tensors_record(message.tensors), CONTROL: tensors_record(message.control),
                       **records})


def message_of(content: Any) -> Message:
    """The fs_gmfl :class:`Message` in a Flower ``RecordDict`` (:class:`WireError` if malformed)."""
    if not isinstance(content, RecordDict):
        raise WireError(f"content is not a record dict (got {type(content).__name__})")
    unknown = sorted(set(content) - {TENSORS, CONTROL, CONFIG, METRICS})
    if unknown:
        raise WireError(f"unknown record {unknown[0][:60]!r}")
    for name in (TENSORS, CONTROL):
        if name not in content:
            raise WireError(f"record '{name}' is missing")
    return Message(tensors_of(content[TENSORS], what=TENSORS),
                   tensors_of(content[CONTROL], what=CONTROL, controls=True))


def state_records(state: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """A nested state as ``{prefix + ".tensors": ArrayRecord, prefix + ".tree": ConfigRecord}``."""
    tree, tensors = flatten_state(dict(state))
    return {f"{prefix}.tensors": tensors_record(tensors), f"{prefix}.tree": ConfigRecord({"json": json.dumps(tree)})}


def state_from_records(records: Mapping[str, Any], prefix: str) -> dict[str, Any] | None:
    """Inverse of :func:`state_records` (``None`` if ``records`` holds no such state)."""
    tree_record = records.get(f"{prefix}.tree")
    tensor_record = records.get(f"{prefix}.tensors")
    if tree_record is None or tensor_record is None:
        return None
    tree = json.loads(tree_record["json"])
    return unflatten_state(tree, tensors_of(tensor_record, what=prefix))

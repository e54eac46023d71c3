"""The toy method's one declaration: everything the package needs to know about it."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from fs_gmfl.core.message import Message, samples_tensor, tensor_bytes
from fs_gmfl.core.registry import Method, MethodContext, MethodSpec
from tests.toy_method.client import HeadClient
from tests.toy_method.strategy import HeadAverage


def build(ctx: MethodContext) -> Method:
    """The head-averaging strategy and client."""
    strategy = HeadAverage(ctx.initial)
    return Method(strategy, HeadClient(strategy.head_keys), {"head_tensors": len(strategy.head_keys)})


def estimate(cfg: Any, initial: dict[str, Tensor]) -> dict[str, Any]:
    """Bytes per round: the head each way, plus the sample count on the uplink."""
    head = HeadAverage(initial).configure_round(1, [0])[0]
    uplink = Message(head.tensors, {"num_samples": samples_tensor(1)})
    clients = cfg.federate.clients_per_round()
    return {"per_round": {"clients": clients, "uplink_bytes": clients * uplink.nbytes,
                          "downlink_bytes": clients * sum(tensor_bytes(t) for t in head.tensors.values())}}


TOY = MethodSpec(name="toy_head", build=build, estimate=estimate, hosts=("sim",),
                 summary="FedAvg of the classification head only (a test method)",
                 example_overrides=("federate.method", "toy_head"))
SPECS = [TOY]

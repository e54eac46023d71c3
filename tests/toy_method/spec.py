"""The toy method's one declaration: everything the package needs to know about it."""

from __future__ import annotations

import dataclasses
from typing import Any

from fs_gmfl.core.message import Message, samples_tensor, tensor_bytes
from fs_gmfl.core.registry import EstimateContext, Method, MethodContext, MethodSpec
from tests.toy_method.client import HeadClient
from tests.toy_method.config import ToyConfig
from tests.toy_method.strategy import HeadAverage


def build(ctx: MethodContext) -> Method:
    """The head-averaging strategy and client."""
    return head_method(HeadAverage(ctx.initial))


def build_tuned(ctx: MethodContext) -> Method:
    """The same with the server step of the ``toy_head_tuned`` section."""
    return head_method(HeadAverage(ctx.initial, server_lr=ctx.cfg.toy_head_tuned.server_lr))


def head_method(strategy: HeadAverage) -> Method:
    """The method around ``strategy``."""
    return Method(strategy, HeadClient(strategy.head_keys), {"head_tensors": len(strategy.head_keys)})


def estimate(ctx: EstimateContext) -> dict[str, Any]:
    """Bytes per round: the head each way, plus the sample count on the uplink."""
    head = HeadAverage(ctx.initial).configure_round(1, [0])[0]
    uplink = Message(head.tensors, {"num_samples": samples_tensor(1)})
    clients = ctx.cfg.federate.clients_per_round()
    return {"per_round": {"clients": clients, "uplink_bytes": clients * uplink.nbytes,
                          "downlink_bytes": clients * sum(tensor_bytes(t) for t in head.tensors.values())}}


TOY = MethodSpec(name="toy_head", build=build, estimate=estimate, hosts=("sim",),
                 summary="FedAvg of the classification head only (a test method)",
                 example_overrides=("federate.method", "toy_head"))
SPECS = [TOY]
#: a variant with its own YAML section: such a method must be found before the schema is built (an entry point).
TOY_TUNED = dataclasses.replace(TOY, name="toy_head_tuned", build=build_tuned, config_section="toy_head_tuned",
                                config_class=ToyConfig, example_overrides=("federate.method", "toy_head_tuned"))

"""The YAML section of the toy method's tuned variant (``toy_head_tuned.*``)."""

from __future__ import annotations

from dataclasses import dataclass

from fs_gmfl.config.fields import opt


@dataclass
class ToyConfig:
    """Server step on the averaged head."""

    server_lr: float = opt(1.0, "New head = old + server_lr x (mean of the uploads - old); 1 is plain FedAvg.",
                           gt=0.0, le=1.0)

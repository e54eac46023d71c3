"""The ``fedprox:`` YAML section."""

from __future__ import annotations

from dataclasses import dataclass

from fs_gmfl.config.fields import opt


@dataclass
class FedProxConfig:
    """FedProx's one hyper-parameter: the weight of the proximal term."""

    mu: float = opt(0.01, "Proximal weight mu: each client minimises its loss plus mu/2 * ||w - w_global||^2 over "
                    "the tensors it trains (Li et al. 2020, eq. 2); 0 is FedIT.", ge=0.0)

"""FedProx's bytes per round (``fs-gmfl comm``): FedIT's, since the proximal term never leaves the client."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fs_gmfl.core.registry import spec_of

if TYPE_CHECKING:
    from fs_gmfl.core.registry import EstimateContext


def estimate(ctx: EstimateContext) -> dict[str, Any]:
    """FedIT's estimator applied to FedProx's strategy (a ``LoraFedAvg``: same downlink, same uplink)."""
    return spec_of("fedit").estimator()(ctx)

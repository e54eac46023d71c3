"""GMFL's server over FedIT or FFA-LoRA assembled from parts, for tests that drive the strategy directly."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from fs_gmfl.core.fedavg.strategy import LoraFedAvg
from fs_gmfl.core.gmfl.strategy import GlobalMasking
from fs_gmfl.core.gmfl.wrapper import GMFLStrategy


def gmfl_over_lora_fedavg(initial: Mapping[str, Tensor], masking: GlobalMasking, *, variant: str = "fedit",
                          downlink: str = "stateless") -> GMFLStrategy:
    """GMFL's server over FedIT or FFA-LoRA built from parts (what ``wrap_method`` builds from a config).

    ``downlink`` is ``gmfl.downlink``: under ``stateful_sync`` the base sends only
    changed tensors and the mask travels only when it changed.
    """
    return GMFLStrategy(LoraFedAvg(initial, variant=variant, downlink=downlink), masking, mask_sync=downlink)

"""FedIT and FFA-LoRA: FedAvg of LoRA adapters (the base methods GMFL wraps)."""

from fs_gmfl.core.fedavg.client import LoraClient
from fs_gmfl.core.fedavg.strategy import LoraFedAvg, base_trainable_keys, mask_candidate_keys

__all__ = ["LoraClient", "LoraFedAvg", "base_trainable_keys", "mask_candidate_keys"]

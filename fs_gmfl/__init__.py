"""fs_gmfl: communication- and memory-efficient federated LLM fine-tuning methods.

GMFL global masking, HAFL heterogeneous importance-aware LoRA, FedKRSO random
subspaces and FedHFT masked adapters, as host-agnostic algorithm cores with
two hosts: the embedded in-process simulator (default) and FederatedScope-LLM.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]

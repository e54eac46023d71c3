"""FedKRSO: federated K-seed random-subspace full fine-tuning (Yang et al., arXiv 2602.03019, 2026)."""

from fs_gmfl.core.fedkrso.client import FedKRSOClient, SubspaceSession, exclude_from_weight_decay
from fs_gmfl.core.fedkrso.config import FedKRSOConfig
from fs_gmfl.core.fedkrso.ops import (apply_update_, expected_seeds_used, layer_rank,
                                      layer_seed, merge_, projection, round_seeds)
from fs_gmfl.core.fedkrso.strategy import FedKRSOStrategy
from fs_gmfl.core.fedkrso.wire import LogEntry, downlink_message, parse_downlink, uplink_message

#: the name before the layout of issue #15 (every server side is a ``*Strategy``).
FedKRSOServer = FedKRSOStrategy

__all__ = ["FedKRSOClient", "FedKRSOConfig", "FedKRSOServer", "FedKRSOStrategy", "LogEntry", "SubspaceSession",
           "apply_update_", "downlink_message", "exclude_from_weight_decay",
           "expected_seeds_used", "layer_rank", "layer_seed", "merge_", "parse_downlink", "projection", "round_seeds",
           "uplink_message"]

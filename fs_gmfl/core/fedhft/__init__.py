"""FedHFT: mixture of masked adapters with clustered personalisation (Ilhan et al., IEEE CogMI 2025)."""

from fs_gmfl.core.fedhft.client import FedHFTClient
from fs_gmfl.core.fedhft.config import FedHFTConfig, FedHFTLevels
from fs_gmfl.core.fedhft.ops import (align_memberships, assign_levels, gmm_memberships, kept_row_count,
                                     low_rank_factors, mixture, row_energies, top_rows)
from fs_gmfl.core.fedhft.strategy import FedHFTStrategy
from fs_gmfl.core.fedhft.wire import AdapterLayout, downlink_message, parse_uplink, uplink_message

__all__ = ["AdapterLayout", "FedHFTClient", "FedHFTConfig", "FedHFTLevels", "FedHFTStrategy", "align_memberships",
           "assign_levels", "downlink_message", "gmm_memberships", "kept_row_count", "low_rank_factors",
           "mixture", "parse_uplink", "row_energies", "top_rows", "uplink_message"]

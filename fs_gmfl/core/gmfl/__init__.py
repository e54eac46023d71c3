"""GMFL: global masking for federated LoRA fine-tuning (Huang et al., ACL 2026)."""

from fs_gmfl.core.gmfl.config import GMFLConfig
from fs_gmfl.core.gmfl.ops import freeze_ratio, frozen_count, schedule, select_frozen, update_l1
from fs_gmfl.core.gmfl.strategy import GlobalMasking

__all__ = ["GMFLConfig", "GlobalMasking", "freeze_ratio", "frozen_count", "schedule", "select_frozen", "update_l1"]

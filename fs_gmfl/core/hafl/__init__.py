"""HAFL: importance-aware rank-1 truncation / freezing with adaptive rank-1 aggregation (Su et al., ICC 2025)."""

from fs_gmfl.core.hafl.client import HAFLClient, client_alpha, component_masks
from fs_gmfl.core.hafl.config import ClientProfile, HAFLConfig
from fs_gmfl.core.hafl.importance import ImportanceTracker, update_importance
from fs_gmfl.core.hafl.ops import (ComponentUpdate, assign_profiles, component_scores,
                                   element_score, largest_remainder, product_norm, rank1_norms, sensitivity,
                                   smooth_importance, take_components, top_components, truncated_factors)
from fs_gmfl.core.hafl.profiles import client_capacities, profile_report
from fs_gmfl.core.hafl.strategy import HAFLStrategy
from fs_gmfl.core.hafl.wire import build_uplink

__all__ = ["ClientProfile", "ComponentUpdate", "HAFLClient", "HAFLConfig", "HAFLStrategy", "ImportanceTracker",
           "assign_profiles", "build_uplink", "client_alpha", "client_capacities",
           "component_masks", "component_scores", "element_score", "largest_remainder", "product_norm",
           "profile_report", "rank1_norms", "sensitivity", "smooth_importance", "take_components",
           "top_components", "truncated_factors", "update_importance"]

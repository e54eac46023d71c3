"""FLoRA (Wang et al., NeurIPS 2024): stacking aggregation of heterogeneous-rank LoRA, merged into the base weights."""

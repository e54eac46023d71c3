"""Configuration of federated full fine-tuning (the ``fft:`` YAML subtree)."""

from __future__ import annotations

from dataclasses import dataclass

from fs_gmfl.config.fields import opt


@dataclass
class FFTConfig:
    """Federated full fine-tuning: FedAvg of the targeted weight matrices and the head.

    Selected with ``federate.method: fft``. Clients train the targeted weights
    and the head with ``train.optimizer`` (AdamW: weights, gradients and two
    moments per parameter) and exchange them in full each round. The other
    backbone weights (embeddings, LayerNorm, biases) stay frozen, as in
    FedKRSO, so the two methods train the same parameters.
    """

    target_modules: list[str] = opt(factory=list, help="Linear modules trained in full (name suffixes); empty: "
                                    "the same default as fedkrso.target_modules (every linear layer of the "
                                    "transformer blocks).")

"""Configuration of FedKRSO (the ``fedkrso:`` YAML subtree)."""

from __future__ import annotations

from dataclasses import dataclass

from fs_gmfl.config.fields import fail, opt

STATE_POLICIES = ("reset", "reset_moments", "transform")
WEIGHT_DECAY_POLICIES = ("none", "projected")
CATCHUP_POLICIES = ("auto", "replay", "full")
WEIGHTINGS = ("samples", "uniform")
BASES = ("gaussian", "orthogonal", "identity")


@dataclass
class FedKRSOConfig:
    """FedKRSO: federated K-seed random-subspace full fine-tuning with per-seed accumulators.

    Yang, Wu, Guo, Sun, Gong, "FedKRSO: Communication and Memory Efficient
    Federated Fine-Tuning of Large Language Models", arXiv 2602.03019 (2026).
    Selected with ``federate.method: fedkrso``. Local training uses
    ``train.*`` (optimizer, learning rate, schedule, steps); the task head is
    trained and averaged normally with ``train.optimizer.weight_decay``.
    """

    num_seeds: int = opt(10, "K: seeds (random subspaces) the server shares each round.", ge=1, le=65536)
    rank: int = opt(4, "r: subspace rank per targeted layer (clamped to min(d_in, d_out)).", ge=1)
    interval: int = opt(10, "J: optimizer steps per interval; each interval trains in one seed's subspace, then "
                        "merges B P into W. A round's last interval may be shorter.", ge=1)
    target_modules: list[str] = opt(factory=list, help="Linear modules trained in full through subspaces "
                                    "(name suffixes); empty: every linear layer of the transformer blocks "
                                    "(BERT/RoBERTa: query, key, value, intermediate.dense, output.dense; OPT: "
                                    "q_proj, k_proj, v_proj, out_proj, fc1, fc2; fs_gmfl.core.targets lists the "
                                    "known architectures); for another architecture the error lists its linear "
                                    "modules.")
    basis: str = opt("gaussian", "The projections P: 'gaussian' (the paper: i.i.d. N(0, 1/r) entries); "
                     "'orthogonal' (the same draw with its rows orthonormalised and scaled by sqrt(d_in/r), so "
                     "P P^T = (d_in/r) I); 'identity' (P = I, which needs r >= d_in of every targeted layer and "
                     "d_out >= d_in: no subspace, so FedKRSO becomes federated full fine-tuning through its own "
                     "accumulators; a diagnostic of what the random basis costs).", choices=BASES)
    state_policy: str = opt("reset", "Optimizer state of B when an interval starts: 'reset' clears it, step "
                            "counter included (Adam's bias correction restarts at step 1); 'reset_moments' zeroes "
                            "the moments and keeps the step counter (the authors' code, so bias correction "
                            "continues from the round's step count); 'transform' maps the first moment to the new "
                            "subspace, m <- (r/d_in) m P_old P_new^T, second moment kept.", choices=STATE_POLICIES)
    subspace_weight_decay: str = opt("none", "Weight decay of the targeted weights: 'none', or 'projected' (the "
                                     "gradient of (wd/2)||W + B P||^2 projected into the subspace, "
                                     "wd = train.optimizer.weight_decay). Decoupled decay of the whole W cannot "
                                     "travel as accumulators, so it is not offered.",
                                     choices=WEIGHT_DECAY_POLICIES, inferred=True)
    catchup: str = opt("auto", "How a client that missed rounds reaches the global weights: 'auto' (the cheaper "
                       "of replaying the log of (seeds, averaged accumulators) and sending the full targeted "
                       "weights), 'replay' (always replay), 'full' (full weights whenever a round was missed).",
                       choices=CATCHUP_POLICIES, inferred=True)
    send_all_slots: bool = opt(False, "Clients send all K accumulator slots (zeros for unused seeds) and no seed "
                               "indices: fixed-shape uplinks for secure aggregation.", inferred=True)
    seed_bits: int = opt(63, "Round seeds are drawn without replacement from [1, 2^seed_bits - 1].", ge=1, le=63)
    weighting: str = opt("samples", "Aggregation weights: 'samples' (proportional to each client's sample count) "
                         "or 'uniform' (the authors' code).", choices=WEIGHTINGS, inferred=True)

    def __post_init__(self) -> None:
        if self.num_seeds > 2 ** self.seed_bits - 1:
            fail(self, "seed_bits", self.seed_bits, f"at least {self.num_seeds.bit_length()} so that "
                 f"{self.num_seeds} distinct seeds (fedkrso.num_seeds) exist")

"""FLoRA's maths (spec GMFL.md section 7.5): stacking, built reply by reply, the merge, the merged weight, fresh LoRA.

Client k trains ``A_k`` (``r_k x d_in``) and ``B_k`` (``d_out x r_k``) with
scaling ``s_k`` (``alpha / r`` or ``alpha / r_k``, ``flora.scaling``) and
sample share ``p_k``. Stacking along the rank dimension,

    A_stack = concat_k(p_k s_k A_k)   (rows)      B_stack = concat_k(B_k)   (columns)

gives ``B_stack A_stack = sum_k p_k s_k B_k A_k`` exactly, whatever the
ranks: the block structure has no cross terms (FLoRA's "noise-free"
aggregation). With one scaling ``s = alpha / r`` this is spec 7.5's
``(alpha / r) B_stack A_stack`` with ``A_stack = concat_k(p_k A_k)``. The
product is merged into the base weight, ``W <- W + B_stack A_stack``, and
every client starts the next round from fresh LoRA modules (``B = 0``). The
server builds the stacks reply by reply (:class:`StackFold`) and merges them
with :func:`add_stacked`, the merge clients keeping their own update repeat.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fs_gmfl.core.adapter import LoraPair, lora_pairs
from fs_gmfl.core.seeding import generator
from fs_gmfl.errors import AggregationError

F64 = torch.float64
#: ``llm.adapter.args[0].init_lora_weights`` values (peft's ``True`` and ``"gaussian"``).
INITS = ("default", "gaussian")


# -- stacking (spec 7.5) ------------------------------------------------------------------------------------
def stack_lora(a: Sequence[Tensor], b: Sequence[Tensor], weights: Sequence[float]) -> tuple[Tensor, Tensor]:
    """``(A_stack, B_stack)``: ``concat_k(w_k A_k)`` along rows and ``concat_k(B_k)`` along columns (float64).

    ``w_k`` is ``p_k s_k`` (sample share times the client's LoRA scaling);
    ranks may differ between clients. ``B_stack @ A_stack == sum_k w_k B_k A_k``.
    """
    if not (len(a) == len(b) == len(weights)) or not a:
        raise AggregationError(f"stacking needs one A, B and weight per client, got {len(a)}, {len(b)}, "
                               f"{len(weights)}")
    a_stack = torch.cat([float(w) * ak.to(F64) for ak, w in zip(a, weights)], dim=0)
    b_stack = torch.cat([bk.to(F64) for bk in b], dim=1)
    return a_stack, b_stack


class StackFold:
    """The round's stacks built one reply at a time: ``n_k s_k A_k`` and ``B_k`` per module, kept until the end.

    :meth:`add` copies one client's factors (float64 ``n_k s_k A_k``, ``B_k``)
    and keeps no reference to the reply; :meth:`stacks` divides the A rows by
    ``sum_k n_k`` and returns :func:`stack_lora`'s stacks in float32, the
    form the server merges and (``flora.downlink: stacked``) sends. Memory:
    ``sum_k r_k (d_in + d_out)`` values per module, growing with the clients
    of the round (one LoRA per client), which is less than one float64
    ``d_out x d_in`` running sum while ``sum_k r_k < d_in d_out / (d_in + d_out)``.

    Args:
        modules: the module names.
    """

    def __init__(self, modules: Sequence[str]) -> None:
        self.a_rows: dict[str, list[Tensor]] = {m: [] for m in modules}
        self.b_cols: dict[str, list[Tensor]] = {m: [] for m in modules}
        self.total = 0.0
        self.count = 0

    def add(self, factors: Mapping[str, tuple[Tensor, Tensor]], scaling: float, weight: float) -> None:
        """Keep ``weight * scaling * A`` and ``B`` of every module (``factors[module] = (A, B)``).

        Raises:
            AggregationError: the weight is negative or not finite, or a module is missing.
        """
        w = float(weight)
        if not math.isfinite(w) or w < 0:
            raise AggregationError(f"weights must be finite and non-negative, got {weight}")
        missing = [m for m in self.a_rows if m not in factors]
        if missing:
            raise AggregationError(f"modules {missing[:3]} missing from client {self.count}")
        for module in self.a_rows:
            a, b = factors[module]
            self.a_rows[module].append(a.detach().to(device="cpu", dtype=F64) * (w * float(scaling)))
            self.b_cols[module].append(b.detach().to(device="cpu", dtype=torch.float32, copy=True))
        self.total += w
        self.count += 1

    def stacks(self) -> dict[str, tuple[Tensor, Tensor]]:
        """``(A_stack, B_stack)`` per module, float32: ``concat_k(p_k s_k A_k)`` rows and ``concat_k(B_k)`` columns.

        Raises:
            AggregationError: nothing was added or the weights sum to zero.
        """
        if not self.count or self.total <= 0:
            raise AggregationError("no weighted factors to stack")
        return {m: ((torch.cat(self.a_rows[m], dim=0) / self.total).to(torch.float32),
                    torch.cat(self.b_cols[m], dim=1)) for m in self.a_rows}


# -- merged weights ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MergedModule:
    """One LoRA-adapted module whose base weight FLoRA merges into.

    Attributes:
        pair: its LoRA factor keys (adapter keys) and module path.
        weight_name: ``named_parameters`` name of its base weight.
        d_out, d_in: the layer's output and input widths.
        transposed: the weight is stored ``d_in x d_out`` (transformers ``Conv1D``, peft ``fan_in_fan_out``).
    """

    pair: LoraPair
    weight_name: str
    d_out: int
    d_in: int
    transposed: bool

    @property
    def weight_shape(self) -> tuple[int, int]:
        """Shape of the stored base weight (and of its merged delta)."""
        return (self.d_in, self.d_out) if self.transposed else (self.d_out, self.d_in)


def merged_modules(model: nn.Module, adapter: Mapping[str, Tensor]) -> list[MergedModule]:
    """Every LoRA-adapted module of ``model`` (a peft model) with its base weight, in adapter-key order.

    Args:
        model: the peft model (any device, the meta device included).
        adapter: its adapter tensors by adapter key (for the factor shapes).

    Raises:
        ValueError: a LoRA module has no ``base_layer.weight``.
    """
    params = dict(model.named_parameters())
    out = []
    for pair in lora_pairs(adapter):
        name = f"{pair.module}.base_layer.weight"
        if name not in params:
            raise ValueError(f"LoRA module '{pair.module}' has no base weight '{name}'")
        layer = model.get_submodule(pair.module)
        out.append(MergedModule(pair, name, d_out=int(adapter[pair.b_key].shape[0]),
                                d_in=int(adapter[pair.a_key].shape[1]),
                                transposed=bool(getattr(layer, "fan_in_fan_out", False))))
    return out


def merged_weight(base: Tensor, delta: Tensor | None) -> Tensor:
    """``W0 + delta`` computed in float32 (or float64 for a float64 base), in ``base``'s dtype; ``base`` if no delta.

    The one formula both the server (evaluation) and the clients (their
    starting model) use, so the two hold bit-identical merged weights.
    """
    if delta is None:
        return base.detach().clone()
    wide = torch.promote_types(base.dtype, torch.float32)
    return (base.to(wide) + delta.to(device=base.device, dtype=wide)).to(base.dtype)


def add_stacked(delta: Tensor, module: MergedModule, a_stack: Tensor, b_stack: Tensor) -> Tensor:
    """``delta + B_stack A_stack`` in the stored layout (float32), the one merge the server and the clients compute.

    The product is added one rank-1 term at a time in float64 (``addr_``:
    every entry is a plain sum in a fixed order, no reduction a thread count
    or a BLAS could reorder), so a client applying the same stacks to the same
    ``delta`` gets the server's result bit for bit.
    """
    total = delta.to(device="cpu", dtype=F64, copy=True)
    a64, b64 = a_stack.to(device="cpu", dtype=F64), b_stack.to(device="cpu", dtype=F64)
    for j in range(a64.shape[0]):
        if module.transposed:
            total.addr_(a64[j], b64[:, j])
        else:
            total.addr_(b64[:, j], a64[j])
    return total.to(device=delta.device, dtype=delta.dtype)


# -- fresh LoRA (re-initialised every round) -------------------------------------------------------------
def fresh_lora_a(seed: int, module: str, *, rank: int, d_in: int, init: str) -> Tensor:
    """A fresh ``A`` (``rank x d_in``, float32) for ``module`` from the round's seed, as peft initialises one.

    ``default``: uniform on ``[-1/sqrt(d_in), 1/sqrt(d_in)]`` (peft's
    ``kaiming_uniform_(a=sqrt(5))``); ``gaussian``: normal with standard
    deviation ``1/rank`` (peft's ``init_lora_weights="gaussian"``). ``B``
    starts at zero. Every client of a round with the same rank starts from
    the same ``A``; the next round draws another.
    """
    if init not in INITS:
        raise ValueError(f"unknown LoRA initialisation {init!r}; expected one of {INITS}")
    g = generator(seed, "flora-init", module)
    if init == "gaussian":
        return torch.randn(rank, d_in, generator=g) / rank
    bound = 1.0 / math.sqrt(d_in)
    return (torch.rand(rank, d_in, generator=g) * 2 - 1) * bound


def fresh_factors(modules: Sequence[MergedModule], seed: int, *, rank: int, init: str) -> dict[str, Tensor]:
    """Every module's fresh ``A`` (:func:`fresh_lora_a`) and zero ``B`` of rank ``rank``, by adapter key."""
    out: dict[str, Tensor] = {}
    for m in modules:
        out[m.pair.a_key] = fresh_lora_a(seed, m.pair.module, rank=rank, d_in=m.d_in, init=init)
        out[m.pair.b_key] = torch.zeros(m.d_out, rank)
    return out

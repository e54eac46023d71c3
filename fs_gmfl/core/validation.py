"""Server-side validation of client payloads.

A payload is checked completely before any of it is used, so that a rejected
payload cannot partially update the global model. Functions return a reason
string (``None`` when the payload is acceptable) rather than raising, so
strategies can log the reason, count it and carry on with the other clients.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

#: default bound on the absolute value of any uploaded entry (so an L2 norm above 1e4 * sqrt(numel) is impossible).
DEFAULT_MAX_ABS = 1e4


def check_tensors(
    received: Mapping[str, Tensor],
    reference: Mapping[str, Tensor],
    *,
    expected_keys: set[str] | list[str],
    max_abs: float = DEFAULT_MAX_ABS,
) -> str | None:
    """Check uploaded tensors against the global ones they will be averaged with.

    Args:
        received: the tensors of one uplink.
        reference: global tensors giving the expected shape and dtype per key.
        expected_keys: the keys the client must have sent (no more, no fewer).
        max_abs: largest allowed absolute entry (an absurd value is rejected).

    Returns:
        ``None`` if acceptable, else the reason for rejection.
    """
    expected = set(expected_keys)
    got = set(received)
    if got != expected:
        missing, extra = sorted(expected - got), sorted(got - expected)
        return f"key mismatch: missing {missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected {extra[:3]}"
    for key in received:
        reason = check_tensor(key, received[key], reference[key], max_abs=max_abs)
        if reason:
            return reason
    return None


def check_tensor(key: str, value: object, like: Tensor, *, max_abs: float = DEFAULT_MAX_ABS) -> str | None:
    """Shape, dtype, finiteness and magnitude check of one uploaded tensor."""
    if not isinstance(value, Tensor):
        return f"'{key}' is a {type(value).__name__}, not a tensor"
    if tuple(value.shape) != tuple(like.shape):
        return f"'{key}' has shape {tuple(value.shape)}, expected {tuple(like.shape)}"
    if value.dtype != like.dtype:
        return f"'{key}' has dtype {value.dtype}, expected {like.dtype}"
    if value.is_floating_point():
        if not bool(torch.isfinite(value).all()):
            return f"'{key}' has non-finite values"
        peak = float(value.abs().max()) if value.numel() else 0.0
        if not math.isfinite(peak) or peak > max_abs:
            return f"'{key}' has an entry of magnitude {peak:.3g} > {max_abs:.3g}"
    return None


def check_sample_count(n: int, *, limit: int = 2**40) -> str | None:
    """A sample count must be a positive integer below an absurd bound."""
    if n <= 0:
        return f"sample count {n} is not positive"
    if n > limit:
        return f"sample count {n} is absurd"
    return None

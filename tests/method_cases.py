"""Scenario tables of methods, built from the registry so a newly registered method is covered automatically.

Each scenario test (faults, checkpoints, validation, causal LM) runs every registered method with the overrides
its spec declares (``MethodSpec.example_overrides``), plus scenario-specific variants (GMFL's options, HAFL's
profiles) and per-method adjustments the scenario needs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from fs_gmfl.core.registry import method_specs


def registered_cases(*, adjust: Mapping[str, Sequence[str]] | None = None,
                     variants: Mapping[str, Sequence[str]] | None = None) -> dict[str, list[str]]:
    """``{case: overrides}``: one case per registered method, then the extra ``variants``.

    Args:
        adjust: overrides appended to a registered method's own (later keys win in the loader).
        variants: additional named cases, e.g. ``{"gmfl": ["gmfl.use", "True", ...]}``.
    """
    adjust = adjust or {}
    cases = {spec.name: [*spec.example_overrides, *adjust.get(spec.name, ())] for spec in method_specs()}
    unknown = set(adjust) - set(cases)
    if unknown:
        raise KeyError(f"adjustments for unregistered methods: {sorted(unknown)}")
    clash = set(variants or {}) & set(cases)
    if clash:
        raise KeyError(f"variant names clash with registered methods: {sorted(clash)}")
    cases.update({name: list(overrides) for name, overrides in (variants or {}).items()})
    return cases

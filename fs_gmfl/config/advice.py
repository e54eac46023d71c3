"""Pre-flight warnings: settings that are valid but quietly do less than they seem to.

A configuration error stops the run (:class:`~fs_gmfl.errors.ConfigError`);
these are not errors, because the run is well defined, but a user would
likely not have chosen them knowingly:

* GMFL (``gmfl.use``) whose refresh period ``gmfl.period`` is not below
  ``federate.total_round_num``: no mask is ever used, the run is its base
  method (:meth:`~fs_gmfl.core.gmfl.config.GMFLConfig.idle_warning`; not for a base with its own mask class,
  ``MethodSpec.gmfl_masking``, such as lora_a2, which re-masks after every round);
* each method's own warnings (``MethodSpec.advise_config``), e.g. HAFL
  without ``hafl.profiles``: one full-rank profile, homogeneous LoRA.

Both hosts log them once per run, one line each: the embedded simulator at
pre-flight (and lists them under ``warnings`` in ``summary.json``), the
FederatedScope host when its server is built (:func:`log_config_warnings`).
"""

from __future__ import annotations

import logging

from fs_gmfl.config.schema import RunConfig
from fs_gmfl.core.registry import spec_of

logger = logging.getLogger(__name__)


def config_warnings(cfg: RunConfig) -> list[str]:
    """Every warning for ``cfg``, one line each: GMFL's, then the method's own."""
    spec = spec_of(cfg.method)
    periodic = spec.gmfl_masking is None  # a base with its own mask class (lora_a2) re-masks every round
    found = [cfg.gmfl.idle_warning(cfg.federate.total_round_num) if periodic else None]
    advise = spec.config_advice()
    if advise is not None:
        found.extend(advise(cfg))
    return [w for w in found if w]


def log_config_warnings(cfg: RunConfig, log: logging.Logger = logger) -> list[str]:
    """Log :func:`config_warnings` (each as one warning line on ``log``) and return them."""
    found = config_warnings(cfg)
    for warning in found:
        log.warning(warning)
    return found

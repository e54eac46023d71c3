"""Hosts: runtimes that move :class:`~fs_gmfl.core.message.Message` objects for the algorithm cores.

Two peers: :mod:`fs_gmfl.hosts.sim` (the embedded simulator) and :mod:`fs_gmfl.hosts.fs`, which adapts
FederatedScope-LLM and is the only code of the package that imports ``federatedscope``. What both use
(datasets, models, evaluation, client and batch sampling, state files, thread counts) is
:mod:`fs_gmfl.hosts.common`; neither imports the other.
"""

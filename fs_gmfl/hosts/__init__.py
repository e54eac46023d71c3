"""Hosts: runtimes that move :class:`~fs_gmfl.core.message.Message` objects for the algorithm cores.

The embedded simulator lives in :mod:`fs_gmfl.sim`; :mod:`fs_gmfl.hosts.fs` adapts
FederatedScope-LLM and is the only code of the package that imports ``federatedscope``.
"""

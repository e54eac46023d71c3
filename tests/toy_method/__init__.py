"""A toy method that lives entirely in this folder: federated averaging of the classification head only.

It exists to prove that a method is added without editing any file outside
its own folder: :mod:`tests.toy_method.spec` declares it, and the registry
picks it up through :func:`fs_gmfl.core.registry.register_method` or an
entry point (``fs_gmfl.methods``) naming ``tests.toy_method.spec:SPECS``.
"""

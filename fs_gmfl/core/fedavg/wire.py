"""FedIT / FFA-LoRA wire format.

* downlink: the global adapter tensors (all of them, or under
  ``gmfl.downlink: stateful_sync`` those changed since the client's last sync);
* uplink: exactly the tensors the client trained, plus ``num_samples``.

Wrapped by GMFL, the downlink also carries the mask
(:data:`fs_gmfl.core.gmfl.wire.MASK`) and frozen tensors are not uploaded.
"""

from fs_gmfl.core.gmfl.wire import MASK

__all__ = ["MASK"]

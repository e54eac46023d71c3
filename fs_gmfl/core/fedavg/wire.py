"""FedIT / FFA-LoRA (+GMFL) wire format.

* downlink: the global adapter tensors (all of them, or under GMFL's
  ``stateful_sync`` those changed since the client's last sync) and, with
  GMFL, the packed trainable flags of the mask candidates under :data:`MASK`;
* uplink: exactly the tensors the client trained, plus ``num_samples``.
"""

#: control key of GMFL's packed trainable-candidate bitmap (one bit per candidate, in candidate order).
MASK = "mask"

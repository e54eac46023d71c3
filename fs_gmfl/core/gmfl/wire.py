"""GMFL's wire format: one control entry on the downlink.

The wrapped base's messages travel unchanged; GMFL adds, under :data:`MASK`,
the packed trainable flags of the mask units (one bit per unit, in the base's
canonical unit order, :func:`~fs_gmfl.core.message.pack_bits`) once a refresh
has happened (``stateless``), or whenever it changed since the client's last
mask (``stateful_sync``). Frozen units are absent from the uplink.
"""

#: control key of GMFL's packed trainable-unit bitmap (one bit per unit, in unit order).
MASK = "mask"

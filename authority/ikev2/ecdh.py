"""The KE payload (RFC 7296 §3.4) and Diffie-Hellman group 19, 256-bit random ECP (RFC 5903),
through ``cryptography``.

KE body: DH Group Num (2) | RESERVED (2) | Key Exchange Data. For group 19 the data is the
public point's x | y, 32 octets each (RFC 5903 §7, no 0x04 prefix), and the shared secret g^ir
is the x coordinate of the product (RFC 5903 §9), 32 octets.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from authority.ikev2.errors import PayloadError

DH_ECP_256 = 19
ECP_256_COORD = 32
_KE_FIXED = struct.Struct(">HH")


@dataclass(frozen=True)
class KeyExchange:
    """A KE payload body's content."""

    group: int
    data: bytes


def decode_ke_body(body: bytes) -> KeyExchange:
    """The group and key exchange data of a KE payload body.

    Raises PayloadError for a body too short to hold the fixed part."""
    if len(body) < _KE_FIXED.size:
        raise PayloadError(f"KE: body of {len(body)} octets, the fixed part needs 4")
    group, _ = _KE_FIXED.unpack_from(body)
    return KeyExchange(group, body[_KE_FIXED.size:])


def encode_ke_body(exchange: KeyExchange) -> bytes:
    """A KE payload body.

    Raises PayloadError for a group outside 16 bits."""
    if not 0 <= exchange.group <= 0xFFFF:
        raise PayloadError(f"KE: group {exchange.group} does not fit 16 bits")
    return _KE_FIXED.pack(exchange.group, 0) + exchange.data


class Ecp256:
    """One side's ephemeral group-19 key. ``public`` is x | y; ``shared`` computes g^ir."""

    def __init__(self) -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())
        point = self._key.public_key().public_bytes(serialization.Encoding.X962,
                                                    serialization.PublicFormat.UncompressedPoint)
        self.public = point[1:]

    def shared(self, peer: bytes) -> bytes:
        """g^ir with the peer's x | y.

        Raises PayloadError if ``peer`` is not 64 octets or not a point of the curve."""
        if len(peer) != 2 * ECP_256_COORD:
            raise PayloadError(f"KE: group 19 data must be 64 octets, got {len(peer)}")
        try:
            public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(),
                                                                  b"\x04" + peer)
        except ValueError as exc:
            raise PayloadError("KE: the peer's group 19 value is not a point of the curve") \
                from exc
        return self._key.exchange(ec.ECDH(), public)


__all__ = ["DH_ECP_256", "Ecp256", "KeyExchange", "decode_ke_body", "encode_ke_body"]

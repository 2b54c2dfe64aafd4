"""The SA payload of IKE_SA_INIT (RFC 7296 §3.3): its proposals and transforms, and the choice a
responder makes among them.

Wire layout of the SA payload body: proposals, each::

    Last Substruc (0 last, 2 more) | RESERVED | Proposal Length (2) | Proposal Num |
    Protocol ID | SPI Size | Num Transforms | SPI | Transforms

and each transform::

    Last Substruc (0 last, 3 more) | RESERVED | Transform Length (2) | Transform Type |
    RESERVED | Transform ID (2) | Attributes

Attributes are TV (AF bit set: type and a 2-octet value) or TLV; the only one IKE defines is
Key Length (14, TV, in bits). The decoder refuses anything malformed with PayloadError; it
keeps unknown transforms and attributes so that a choice can skip them.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from authority.ikev2.errors import PayloadError

PROTOCOL_IKE = 1
TRANSFORM_ENCR = 1
TRANSFORM_PRF = 2
TRANSFORM_INTEG = 3
TRANSFORM_DH = 4
TRANSFORM_ESN = 5
ATTR_KEY_LENGTH = 14
_AF_TV = 0x8000
_MORE_PROPOSALS = 2
_MORE_TRANSFORMS = 3
_PROPOSAL = struct.Struct(">BBHBBBB")
_TRANSFORM = struct.Struct(">BBHBBH")
_ATTR = struct.Struct(">HH")


@dataclass(frozen=True)
class Transform:
    """One transform: its type, id and (for ENCR) key length in bits, 0 when absent.
    ``unknown_attributes`` is True when it carried attributes other than Key Length."""

    kind: int
    transform_id: int
    key_bits: int = 0
    unknown_attributes: bool = False


@dataclass(frozen=True)
class Proposal:
    """One proposal of an SA payload."""

    number: int
    protocol: int
    spi: bytes
    transforms: tuple[Transform, ...]

    def of_kind(self, kind: int) -> list[Transform]:
        """The transforms of one type, in the order offered. Never raises."""
        return [t for t in self.transforms if t.kind == kind]


@dataclass(frozen=True)
class IkeSuite:
    """What a responder chose for an IKE SA: the ids of RFC 7296 §3.3.2 (integ 0 with AEAD)."""

    proposal_number: int
    encr_id: int
    encr_key_bits: int
    prf_id: int
    integ_id: int
    dh_group: int


def _attributes(data: bytes, where: str) -> tuple[int, bool]:
    """(key length in bits or 0, whether other attributes appear).

    Raises PayloadError for a truncated attribute."""
    key_bits, unknown, offset = 0, False, 0
    while offset < len(data):
        if len(data) - offset < _ATTR.size:
            raise PayloadError(f"{where}: truncated attribute")
        kind, value = _ATTR.unpack_from(data, offset)
        offset += _ATTR.size
        if not kind & _AF_TV:
            if len(data) - offset < value:
                raise PayloadError(f"{where}: attribute longer than its transform")
            offset += value
            unknown = True
        elif kind & ~_AF_TV == ATTR_KEY_LENGTH:
            key_bits = value
        else:
            unknown = True
    return key_bits, unknown


def _transforms(data: bytes, count: int, where: str) -> tuple[Transform, ...]:
    """Decode ``count`` transforms filling ``data``.

    Raises PayloadError for malformed transforms or a count that does not match."""
    out: list[Transform] = []
    offset = 0
    while offset < len(data):
        if len(data) - offset < _TRANSFORM.size:
            raise PayloadError(f"{where}: truncated transform")
        last, _, length, kind, _, transform_id = _TRANSFORM.unpack_from(data, offset)
        if length < _TRANSFORM.size or offset + length > len(data):
            raise PayloadError(f"{where}: transform length {length} does not fit")
        key_bits, unknown = _attributes(data[offset + _TRANSFORM.size:offset + length], where)
        out.append(Transform(kind, transform_id, key_bits, unknown))
        offset += length
        if (last == 0) != (offset == len(data)) or last not in (0, _MORE_TRANSFORMS):
            raise PayloadError(f"{where}: Last Substruc {last} disagrees with the length")
    if len(out) != count:
        raise PayloadError(f"{where}: {len(out)} transforms, the header says {count}")
    return tuple(out)


def decode_sa_body(body: bytes) -> list[Proposal]:
    """The proposals of an SA payload body, in order.

    Raises PayloadError for an empty body or any malformed proposal or transform."""
    proposals: list[Proposal] = []
    offset = 0
    while offset < len(body):
        if len(body) - offset < _PROPOSAL.size:
            raise PayloadError("SA: truncated proposal")
        last, _, length, number, protocol, spi_size, count = _PROPOSAL.unpack_from(body, offset)
        where = f"SA proposal {number}"
        end = offset + length
        if length < _PROPOSAL.size + spi_size or end > len(body):
            raise PayloadError(f"{where}: length {length} does not fit")
        spi_end = offset + _PROPOSAL.size + spi_size
        proposals.append(Proposal(number, protocol, body[offset + _PROPOSAL.size:spi_end],
                                  _transforms(body[spi_end:end], count, where)))
        offset = end
        if (last == 0) != (offset == len(body)) or last not in (0, _MORE_PROPOSALS):
            raise PayloadError(f"{where}: Last Substruc {last} disagrees with the length")
    if not proposals:
        raise PayloadError("SA: no proposal")
    return proposals


def _encode_transform(transform: Transform, last: bool) -> bytes:
    attrs = _ATTR.pack(_AF_TV | ATTR_KEY_LENGTH, transform.key_bits) if transform.key_bits \
        else b""
    return _TRANSFORM.pack(0 if last else _MORE_TRANSFORMS, 0, _TRANSFORM.size + len(attrs),
                           transform.kind, 0, transform.transform_id) + attrs


def encode_sa_body(proposals: Sequence[Proposal]) -> bytes:
    """An SA payload body with these proposals (Key Length as its only attribute).

    Raises PayloadError for no proposal, or one without transforms or too long to encode."""
    if not proposals:
        raise PayloadError("SA: no proposal")
    out = b""
    for index, proposal in enumerate(proposals):
        if not proposal.transforms:
            raise PayloadError(f"SA proposal {proposal.number}: no transform")
        count = len(proposal.transforms)
        transforms = b"".join(_encode_transform(t, i == count - 1)
                              for i, t in enumerate(proposal.transforms))
        length = _PROPOSAL.size + len(proposal.spi) + len(transforms)
        if length > 0xFFFF or count > 0xFF:
            raise PayloadError(f"SA proposal {proposal.number}: too long")
        last = 0 if index == len(proposals) - 1 else _MORE_PROPOSALS
        out += _PROPOSAL.pack(last, 0, length, proposal.number, proposal.protocol,
                              len(proposal.spi), count) + proposal.spi + transforms
    return out


@dataclass(frozen=True)
class Acceptable:
    """What a responder accepts: AEAD ciphers with their key sizes, PRFs and DH groups, each in
    the responder's order of preference."""

    encryption: tuple[tuple[int, int], ...]  # (ENCR id, key bits)
    prfs: tuple[int, ...]
    dh_groups: tuple[int, ...]


def _first(offered: Iterable[Transform], accepted: Sequence[int]) -> int | None:
    ids = {t.transform_id for t in offered if not t.unknown_attributes}
    return next((a for a in accepted if a in ids), None)


def _encryption(proposal: Proposal, acceptable: Acceptable) -> tuple[int, int] | None:
    offered = {(t.transform_id, t.key_bits) for t in proposal.of_kind(TRANSFORM_ENCR)
               if not t.unknown_attributes}
    return next((pair for pair in acceptable.encryption if pair in offered), None)


def choose_ike_suite(proposals: Sequence[Proposal], acceptable: Acceptable) -> IkeSuite | None:
    """The first IKE proposal (in the initiator's order) that offers an acceptable cipher, PRF
    and DH group and no integrity algorithm but "none" (the ciphers are AEAD), with the
    responder's preferred choice within it; None if no proposal qualifies. Never raises."""
    for proposal in proposals:
        if proposal.protocol != PROTOCOL_IKE or proposal.spi:
            continue
        encryption = _encryption(proposal, acceptable)
        prf_id = _first(proposal.of_kind(TRANSFORM_PRF), acceptable.prfs)
        dh_group = _first(proposal.of_kind(TRANSFORM_DH), acceptable.dh_groups)
        integ = {t.transform_id for t in proposal.of_kind(TRANSFORM_INTEG)}
        if encryption is None or prf_id is None or dh_group is None or integ - {0}:
            continue
        return IkeSuite(proposal.number, encryption[0], encryption[1], prf_id, 0, dh_group)
    return None


def suite_proposal(suite: IkeSuite) -> Proposal:
    """The one proposal a responder returns for ``suite`` (RFC 7296 §3.3: the accepted proposal
    with one transform of each type, numbered as offered). Never raises."""
    return Proposal(suite.proposal_number, PROTOCOL_IKE, b"", (
        Transform(TRANSFORM_ENCR, suite.encr_id, suite.encr_key_bits),
        Transform(TRANSFORM_PRF, suite.prf_id),
        Transform(TRANSFORM_DH, suite.dh_group)))


__all__ = [
    "ATTR_KEY_LENGTH",
    "PROTOCOL_IKE",
    "TRANSFORM_DH",
    "TRANSFORM_ENCR",
    "TRANSFORM_ESN",
    "TRANSFORM_INTEG",
    "TRANSFORM_PRF",
    "Acceptable",
    "IkeSuite",
    "Proposal",
    "Transform",
    "choose_ike_suite",
    "decode_sa_body",
    "encode_sa_body",
    "suite_proposal",
]

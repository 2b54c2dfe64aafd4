"""Pure IKEv2 functions for RFC 5723 session resumption: PRFs and prf+, key derivation, the
resumed IKE_AUTH's AUTH value, and the wire codecs of the resumption payloads and messages.
No I/O, no device, no gRPC; bytes in, bytes out.

Stable entry points (outside tools call these): ``prf``, ``prf_plus``, ``resumption_skeyseed``.
"""

from __future__ import annotations

from authority.ikev2.auth import auth_initiator, auth_matches, auth_responder, signed_octets
from authority.ikev2.errors import PayloadError, UnknownTransformError
from authority.ikev2.keys import (
    KeyLengths,
    SaKeys,
    child_keymat,
    derive_ike_keys,
    derive_resumed_keys,
    ike_keymat,
    key_lengths,
    rekey_skeyseed,
    resumption_skeyseed,
    skeyseed,
    split_keys,
)
from authority.ikev2.payloads import (
    Notify,
    ResumeRequest,
    ResumeResponse,
    TicketLtOpaque,
    TicketOpaque,
    TicketSignal,
    decode_resume_request,
    decode_resume_response,
    encode_resume_request,
    encode_resume_response,
    ticket_from_notify,
    ticket_to_notify,
)
from authority.ikev2.prf import (
    PrfInfo,
    prf,
    prf_info,
    prf_key_length,
    prf_output_length,
    prf_plus,
)

__all__ = [
    "KeyLengths", "Notify", "PayloadError", "PrfInfo", "ResumeRequest", "ResumeResponse",
    "SaKeys", "TicketLtOpaque", "TicketOpaque", "TicketSignal", "UnknownTransformError",
    "auth_initiator", "auth_matches", "auth_responder", "child_keymat",
    "decode_resume_request", "decode_resume_response", "derive_ike_keys",
    "derive_resumed_keys", "encode_resume_request", "encode_resume_response", "ike_keymat",
    "key_lengths", "prf", "prf_info", "prf_key_length", "prf_output_length", "prf_plus",
    "rekey_skeyseed", "resumption_skeyseed", "signed_octets", "skeyseed", "split_keys",
    "ticket_from_notify", "ticket_to_notify",
]

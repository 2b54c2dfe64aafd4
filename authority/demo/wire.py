"""Wire helpers of the demo: the gateway kit's SK payload (``authority.ikev2.sk``) and payload
bodies (``authority.ikev2.bodies``), and short hex for printing."""

from __future__ import annotations

from authority.ikev2.bodies import (
    AUTH_SHARED_KEY_MIC,
    ID_FQDN,
    ID_RFC822_ADDR,
    auth_body,
    auth_data,
    describe_id,
    find,
    id_body,
    random_spi,
)
from authority.ikev2.sk import decrypt_message, encrypt_message
from authority.ikev2.wire import PAYLOAD_AUTH


def short(data: bytes, head: int = 6, tail: int = 2, size: bool = False) -> str:
    """``001122334455...eeff``, with `` (180 octets)`` if ``size``; short values in full.
    Never raises."""
    text = data.hex() if len(data) <= head + tail else \
        f"{data[:head].hex()}...{data[-tail:].hex()}"
    return f"{text} ({len(data)} octets)" if size else text


__all__ = ["AUTH_SHARED_KEY_MIC", "ID_FQDN", "ID_RFC822_ADDR", "PAYLOAD_AUTH", "auth_body",
           "auth_data", "decrypt_message", "describe_id", "encrypt_message", "find", "id_body",
           "random_spi", "short"]

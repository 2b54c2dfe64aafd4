"""The IKE SA the demo starts from: the outcome of a simulated IKE_SA_INIT + IKE_AUTH between
the initiator and gateway A, which both sides then hold."""

from __future__ import annotations

import os
from dataclasses import dataclass

from authority.demo.wire import ID_FQDN, ID_RFC822_ADDR, id_body, random_spi
from authority.ikev2.prf import prf_key_length

ENCR_AES_GCM_16 = 20
PRF_HMAC_SHA2_256 = 5
INTEG_NONE = 0
DH_ECP_256 = 19
AUTH_DIGITAL_SIGNATURE = 14

NAMES = {
    ("encr", ENCR_AES_GCM_16): "ENCR_AES_GCM_16",
    ("prf", PRF_HMAC_SHA2_256): "PRF_HMAC_SHA2_256",
    ("integ", INTEG_NONE): "none (AEAD)",
    ("dh", DH_ECP_256): "ECP-256 (19)",
    ("auth", AUTH_DIGITAL_SIGNATURE): "digital signature (14)",
}


def name(kind: str, number: int) -> str:
    """A transform's name for printing, else its number. Never raises."""
    return NAMES.get((kind, number), f"{kind} {number}")


@dataclass(frozen=True)
class InitialSa:
    """What both ends of the first IKE SA agreed on. ``repr`` never shows SK_d."""

    spi_i: bytes
    spi_r: bytes
    sk_d: bytes
    id_i: bytes
    id_r: bytes
    encr_id: int = ENCR_AES_GCM_16
    encr_key_bits: int = 256
    prf_id: int = PRF_HMAC_SHA2_256
    integ_id: int = INTEG_NONE
    dh_group: int = DH_ECP_256
    auth_method: int = AUTH_DIGITAL_SIGNATURE
    gateway_data: bytes = b""

    def __repr__(self) -> str:
        return (f"InitialSa(spi_i={self.spi_i.hex()}, spi_r={self.spi_r.hex()}, "
                f"sk_d=<{len(self.sk_d)} octets>)")


def simulate_initial_exchange(user: str = "alice@vpn.example.net",
                              cluster: str = "vpn.example.net") -> InitialSa:
    """A fresh SA: random SPIs, a random SK_d of the PRF's key length, IDi an RFC822 address,
    IDr the cluster's FQDN (every gateway of the cluster answers as it). Never raises."""
    return InitialSa(spi_i=random_spi(), spi_r=random_spi(),
                     sk_d=os.urandom(prf_key_length(PRF_HMAC_SHA2_256)),
                     id_i=id_body(ID_RFC822_ADDR, user.encode()),
                     id_r=id_body(ID_FQDN, cluster.encode()),
                     gateway_data=b"issued-by=gateway-a;policy=v1")

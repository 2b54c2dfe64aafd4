"""(g) What a resumption saves the gateway: the CPU of a full IKEv2 responder handshake's
public-key work against a redeem call plus the resumption key derivation.

Two full-handshake figures per suite (MODP-2048 + RSA-2048, ECDH P-256 + ECDSA P-256):

- ``handshake_*_us`` (kept from before): one Diffie-Hellman (key pair + shared secret), one
  signature (the responder's AUTH) and one verification (the initiator's AUTH).
- ``handshake_*_chain_us``: the same plus what a responder verifies of the initiator's
  certificate chain, two certificates (a leaf issued by a CA, the CA self-signed, the same key
  type throughout): both certificates parsed from DER (as they arrive in CERT payloads), then one
  signature verification per certificate (the leaf's with the CA's key, the CA's with its own),
  with ``verify_directly_issued_by`` (issuer name match + signature).

Not counted in either: validity dates, extensions, name constraints and policies of the chain,
revocation (CRL / OCSP fetches and their signatures), a longer chain, the full handshake's own
key derivation (SKEYSEED and prf+, about what ``derive_resumed_keys`` costs), the IKE messages'
encoding, encryption and the AUTH payload's octets; so a handshake here is a lower bound and the
saving is understated.

A resumption (RFC 5723) costs one RedeemTicket call (the client CPU measured in the unary redeem
phase, the bench's aio client at ``--concurrency``) and ``derive_resumed_keys``; the gateway's
own client at 1, 8 and 64 concurrent resumptions is measured by authority/bench/gateway.py.
CPU time of this process, one thread.
"""

from __future__ import annotations

import datetime
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import dh, ec, padding, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from authority.bench.targets import ratio
from authority.ikev2 import derive_resumed_keys

#: RFC 3526 group 14 (2048-bit MODP), generator 2
MODP_2048_P = int(
    "FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD129024E088A67CC74020BBEA63B139B22514A0879"
    "8E3404DDEF9519B3CD3A431B302B0A6DF25F14374FE1356D6D51C245E485B576625E7EC6F44C42E9A637ED6B"
    "0BFF5CB6F406B7EDEE386BFB5A899FA5AE9F24117C4B1FE649286651ECE45B3DC2007CB8A163BF0598DA4836"
    "1C55D39A69163FA8FD24CF5F83655D23DCA3AD961C62F356208552BB9ED529077096966D670C354E4ABC9804"
    "F1746C08CA18217C32905E462E36CE3BE39E772C180E86039B2783A2EC07A28FB5C55DF06F4C52C9DE2BCBF6"
    "955817183995497CEA956AE515D2261898FA051015728E5A8AACAA68FFFFFFFFFFFFFFFF", 16)
_MESSAGE = os.urandom(512)  # stands for the signed octets of an IKE_AUTH


@dataclass(frozen=True)
class Savings:
    """Microseconds of CPU per operation, and the handshake / resumption ratios."""

    ecdh_p256_us: float
    modp2048_us: float
    rsa2048_sign_verify_us: float
    ecdsa_p256_sign_verify_us: float
    derive_us: float
    redeem_client_us: float | None
    rsa2048_chain_verify_us: float | None = None
    ecdsa_p256_chain_verify_us: float | None = None

    @property
    def handshake_ecdh_ecdsa_us(self) -> float:
        """ECDH P-256 + ECDSA P-256 sign + verify."""
        return self.ecdh_p256_us + self.ecdsa_p256_sign_verify_us

    @property
    def handshake_modp_rsa_us(self) -> float:
        """MODP-2048 + RSA-2048 sign + verify."""
        return self.modp2048_us + self.rsa2048_sign_verify_us

    @property
    def handshake_ecdh_ecdsa_chain_us(self) -> float | None:
        """ECDH P-256 + ECDSA P-256 sign + verify + a two-certificate ECDSA chain."""
        chain = self.ecdsa_p256_chain_verify_us
        return None if chain is None else self.handshake_ecdh_ecdsa_us + chain

    @property
    def handshake_modp_rsa_chain_us(self) -> float | None:
        """MODP-2048 + RSA-2048 sign + verify + a two-certificate RSA chain."""
        chain = self.rsa2048_chain_verify_us
        return None if chain is None else self.handshake_modp_rsa_us + chain

    @property
    def resumption_us(self) -> float | None:
        """Redeem call (client CPU) + resumption key derivation."""
        return None if self.redeem_client_us is None else self.redeem_client_us + self.derive_us

    def as_json(self) -> dict[str, float | None]:
        """Every figure, and the two ratios (handshake / resumption)."""
        resumption = self.resumption_us
        return {
            "ecdh_p256_us": self.ecdh_p256_us, "modp2048_us": self.modp2048_us,
            "rsa2048_sign_verify_us": self.rsa2048_sign_verify_us,
            "ecdsa_p256_sign_verify_us": self.ecdsa_p256_sign_verify_us,
            "handshake_ecdh_ecdsa_us": self.handshake_ecdh_ecdsa_us,
            "handshake_modp_rsa_us": self.handshake_modp_rsa_us,
            "redeem_client_us": self.redeem_client_us, "derive_resumed_keys_us": self.derive_us,
            "resumption_us": resumption,
            "ratio_ecdh_ecdsa": ratio(self.handshake_ecdh_ecdsa_us, resumption),
            "ratio_modp_rsa": ratio(self.handshake_modp_rsa_us, resumption),
            "rsa2048_chain_verify_us": self.rsa2048_chain_verify_us,
            "ecdsa_p256_chain_verify_us": self.ecdsa_p256_chain_verify_us,
            "handshake_ecdh_ecdsa_chain_us": self.handshake_ecdh_ecdsa_chain_us,
            "handshake_modp_rsa_chain_us": self.handshake_modp_rsa_chain_us,
            "ratio_ecdh_ecdsa_chain": ratio(self.handshake_ecdh_ecdsa_chain_us, resumption),
            "ratio_modp_rsa_chain": ratio(self.handshake_modp_rsa_chain_us, resumption)}


def cpu_us(operation: Callable[[], object], budget: float) -> float:
    """CPU microseconds per call of ``operation``, run for about ``budget`` CPU seconds."""
    operation()
    count = 0
    start = time.process_time()
    while True:
        operation()
        count += 1
        spent = time.process_time() - start
        if spent >= budget and count >= 3:
            return spent / count * 1e6


def measure(redeem_client_us: float | None, budget: float) -> Savings:
    """Time each public-key operation and the key derivation for ``budget`` CPU seconds each."""
    return Savings(
        ecdh_p256_us=cpu_us(_ecdh(), budget), modp2048_us=cpu_us(_modp(), budget),
        rsa2048_sign_verify_us=cpu_us(_rsa(), budget),
        ecdsa_p256_sign_verify_us=cpu_us(_ecdsa(), budget),
        derive_us=cpu_us(_derive, budget), redeem_client_us=redeem_client_us,
        rsa2048_chain_verify_us=cpu_us(_chain(_rsa_key), budget),
        ecdsa_p256_chain_verify_us=cpu_us(_chain(_ec_key), budget))


def _ecdh() -> Callable[[], bytes]:
    peer = ec.generate_private_key(ec.SECP256R1()).public_key()

    def run() -> bytes:
        return ec.generate_private_key(ec.SECP256R1()).exchange(ec.ECDH(), peer)

    return run


def _modp() -> Callable[[], bytes]:
    with warnings.catch_warnings():  # FFDH is deprecated in cryptography, still in IKEv2
        warnings.simplefilter("ignore")
        params = dh.DHParameterNumbers(MODP_2048_P, 2).parameters()
    peer = params.generate_private_key().public_key()

    def run() -> bytes:
        return params.generate_private_key().exchange(peer)

    return run


def _rsa() -> Callable[[], None]:
    ours = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    theirs = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    their_signature = theirs.sign(_MESSAGE, padding.PKCS1v15(), hashes.SHA256())
    their_public = theirs.public_key()

    def run() -> None:
        ours.sign(_MESSAGE, padding.PKCS1v15(), hashes.SHA256())
        their_public.verify(their_signature, _MESSAGE, padding.PKCS1v15(), hashes.SHA256())

    return run


def _ecdsa() -> Callable[[], None]:
    ours = ec.generate_private_key(ec.SECP256R1())
    theirs = ec.generate_private_key(ec.SECP256R1())
    their_signature = theirs.sign(_MESSAGE, ec.ECDSA(hashes.SHA256()))
    their_public = theirs.public_key()

    def run() -> None:
        ours.sign(_MESSAGE, ec.ECDSA(hashes.SHA256()))
        their_public.verify(their_signature, _MESSAGE, ec.ECDSA(hashes.SHA256()))

    return run


_Key = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def _rsa_key() -> _Key:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _ec_key() -> _Key:
    return ec.generate_private_key(ec.SECP256R1())


def _certificate(subject: str, key: _Key, issuer: str, signer: _Key) -> bytes:
    """A DER certificate of ``key`` for ``subject``, signed by ``signer`` (SHA-256)."""
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=subject == issuer, path_length=None),
                              critical=True))
    return builder.sign(signer, hashes.SHA256()).public_bytes(Encoding.DER)


def _chain(make_key: Callable[[], _Key]) -> Callable[[], None]:
    """What a responder verifies of the initiator's chain: a leaf and its CA (self-signed),
    both parsed from DER, one signature verification each (``verify_directly_issued_by``:
    issuer name and signature; raises InvalidSignature / ValueError on a bad chain)."""
    ca_key, leaf_key = make_key(), make_key()
    ca_der = _certificate("bench CA", ca_key, "bench CA", ca_key)
    leaf_der = _certificate("initiator.vpn.example.net", leaf_key, "bench CA", ca_key)

    def run() -> None:
        leaf = x509.load_der_x509_certificate(leaf_der)
        ca = x509.load_der_x509_certificate(ca_der)
        leaf.verify_directly_issued_by(ca)
        ca.verify_directly_issued_by(ca)

    return run


_SK_D, _NI, _NR = os.urandom(32), os.urandom(32), os.urandom(32)
_SPI_I, _SPI_R = os.urandom(7) + b"\x01", os.urandom(7) + b"\x02"


def _derive() -> object:
    """The gateway's resumption keys: HMAC-SHA-256 PRF, AES-GCM-256 (no integrity)."""
    return derive_resumed_keys(5, _SK_D, _NI, _NR, _SPI_I, _SPI_R, 20, 256, 0)

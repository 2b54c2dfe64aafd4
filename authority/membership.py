"""Cluster membership with per-node tokens (``cluster.per_node_tokens``): who holds the cluster
KEK, how a node gets it, and how a removed node is kept from keys made after its removal.

- ``init``: the first node's token makes the KEK (id ``KEK_LABEL``) and a transport key pair;
  the store records the node as the first member and the KEK as the cluster's.
- ``join``: a new node's token makes its transport key pair (RSA-3072, kept in the token:
  a later KEK is delivered to it); the request is published with the public key's SHA-256
  fingerprint, which the operator compares out of band before approving.
- ``approve`` (on any member, through the admin RPC): the member's token wraps the current KEK
  to the joiner's public key (RSA-OAEP); the joiner unwraps it into its token and becomes a
  member (``finish_join``).
- ``remove`` (on any member M, through the admin RPC): M's token makes a NEW KEK and wraps it
  to every remaining member's transport key but its own; one store transaction drops the node,
  makes the new KEK current and stores the deliveries. Each member unwraps its delivery at its
  next heartbeat (``receive_kek``). Ticket keys made afterwards are wrapped under the new KEK,
  which the removed node never had: its token can no longer unwrap them.

The security officer's work (the KEK is CKA_TRUSTED: only the SO can make or unwrap it) goes
through an :class:`Officer`: a ``SecurityOfficer`` in the CLI's own process, or a child process
per call in the server, whose user login would refuse an SO login in its own process.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from authority.config import Config, Pkcs11Settings, Secret
from authority.errors import DeviceUnavailable, FailedPrecondition, NotFound
from authority.store.base import JoinRequest, NodeRecord, Store

log = logging.getLogger(__name__)

#: the first KEK's id (its CKA_LABEL in every token): _wrap.KEK_LABEL, not imported so that
#: this module stays free of the PKCS#11 binding
FIRST_KEK = "ticket-authority-kek"
#: the OAEP hashes a joiner offers, preferred first (the approver's token picks the first it
#: takes; SoftHSM2 takes only SHA-1)
OAEP_HASHES = ("sha256", "sha1")
_FINGERPRINT = re.compile(r"[0-9a-f]{64}")


class Transport(Protocol):
    """A transport public key as the token made it (``_wrap.TransportKey``)."""

    @property
    def der(self) -> bytes: ...
    @property
    def fingerprint(self) -> str: ...


class Officer(Protocol):
    """The security officer's operations on this node's token (``SecurityOfficer``)."""

    def make_kek(self, label: str) -> None: ...
    def has_kek(self, label: str) -> bool: ...
    def destroy_kek(self, label: str) -> bool: ...
    def kek_labels(self) -> list[str]: ...
    def new_transport_key(self, persistent: bool = False) -> Transport: ...
    def drop_transport_key(self, fingerprint: str) -> bool: ...
    def wrap_kek_for(self, public_key_der: bytes, label: str,
                     oaep_hashes: tuple[str, ...]) -> Any: ...
    def unwrap_kek(self, wrapped: Any, label: str, fingerprint: str | None = None) -> None: ...


def fingerprint_text(text: str) -> str | None:
    """A transport key fingerprint as an operator gives it (64 hex digits; ``:`` and spaces
    ignored, any case) in lower case, or None if it is not one. Never raises."""
    value = text.replace(":", "").replace(" ", "").lower()
    return value if _FINGERPRINT.fullmatch(value) else None


def node_name(config: Config) -> str:
    """This node's name: ``cluster.node_name``, else the host name. Never raises."""
    return config.cluster.node_name or socket.gethostname()


def so_settings(config: Config) -> tuple[Pkcs11Settings, Secret]:
    """The token's settings and the SO PIN (the embedded token's ``so.pin``, else
    ``pkcs11.so_pin_file``/``so_pin_env``).

    Raises: FailedPrecondition (per-node tokens off, or no SO PIN configured), StartupError.
    """
    from authority.app import pkcs11_settings

    if not config.cluster.per_node_tokens:
        raise FailedPrecondition("the cluster commands need cluster.per_node_tokens = true "
                                 "(replicas sharing one token need no cluster KEK)")
    settings = pkcs11_settings(config)
    if settings.so_pin is None:
        raise FailedPrecondition("pkcs11.so_pin_file or pkcs11.so_pin_env is not set: the "
                                 "cluster KEK is made and unwrapped by the security officer")
    return settings, settings.so_pin


def init(officer: Officer, store: Store, name: str, now: float) -> NodeRecord:
    """``cluster init``: make the cluster KEK in this token (or adopt the one an interrupted
    init left there) and record this node as the first member.

    Raises: FailedPrecondition (the cluster exists: join it instead), KeyProtectionError,
    DeviceUnavailable.
    """
    current = store.cluster_kek()
    if current is not None:
        raise FailedPrecondition(f"the cluster exists (KEK {current!r}): run `ticket-authority "
                                 "cluster join` on this node and approve it on a member")
    if not officer.has_kek(FIRST_KEK):
        officer.make_kek(FIRST_KEK)
    transport = officer.new_transport_key(persistent=True)
    record = store.found_cluster(name, transport.fingerprint, transport.der, OAEP_HASHES,
                                 FIRST_KEK, now)
    if record is None:
        officer.drop_transport_key(transport.fingerprint)
        raise FailedPrecondition("another node initialised the cluster meanwhile: join it")
    log.info("cluster initialised: node %r, KEK %r", name, FIRST_KEK)
    return record


def request_join(officer: Officer, store: Store, name: str, now: float) -> Transport:
    """``cluster join``, first half: make this token's transport key pair and publish the
    request. Returns the transport key (its fingerprint is what the operator compares).

    Raises: FailedPrecondition (no cluster yet; the name is a member's, or requested already;
    this token holds a KEK already), KeyProtectionError, DeviceUnavailable.
    """
    current = store.cluster_kek()
    if current is None:
        raise FailedPrecondition("no cluster yet: run `ticket-authority cluster init` on the "
                                 "first node")
    if officer.has_kek(current):
        raise FailedPrecondition(f"this token holds the cluster KEK {current!r} already")
    transport = officer.new_transport_key(persistent=True)
    if not store.add_join_request(transport.fingerprint, transport.der, OAEP_HASHES, name,
                                  now):
        officer.drop_transport_key(transport.fingerprint)
        raise FailedPrecondition(f"node name {name!r} is a member's or requested already "
                                 "(`ticket-authority cluster list`)")
    return transport


def finish_join(officer: Officer, store: Store, transport: Transport, deadline: float,
                clock: Callable[[], float] = time.monotonic,
                now: Callable[[], float] = time.time, poll: float = 0.2) -> NodeRecord:
    """``cluster join``, second half: wait for the approval until ``deadline`` (``clock``),
    unwrap the KEK into this token with the transport key, become a member.

    Raises: FailedPrecondition (not approved in time, or the request vanished: nothing
    unwrapped), InvalidArgument (the token refused the wrapped KEK), KeyProtectionError,
    DeviceUnavailable.
    """
    fingerprint = transport.fingerprint
    while True:
        taken = store.take_wrapped_kek(fingerprint)
        if taken is not None:
            break
        if clock() >= deadline:
            officer.drop_transport_key(fingerprint)
            raise FailedPrecondition(f"join request {fingerprint} was not approved in time; "
                                     "its transport key is destroyed (an approval arriving "
                                     "later opens nothing): run join again")
        time.sleep(poll)
    blob, oaep_hash, kek_id = taken
    officer.unwrap_kek(_wrapped(blob, oaep_hash), kek_id, fingerprint)
    record = store.complete_join(fingerprint, now())
    if record is None:
        officer.destroy_kek(kek_id)
        officer.drop_transport_key(fingerprint)
        raise FailedPrecondition(f"join request {fingerprint} expired or was withdrawn after "
                                 "its approval (the KEK unwrapped meanwhile is destroyed); run "
                                 "join again")
    log.info("joined the cluster as %r (KEK %r)", record.name, kek_id)
    return record


def pending(store: Store, fingerprint: str, now: float) -> JoinRequest:
    """The join request with this fingerprint. Raises: NotFound, FailedPrecondition (approved
    already), DeviceUnavailable."""
    fingerprint = fingerprint.strip().lower()
    for request in store.list_join_requests(now):
        if request.fingerprint == fingerprint:
            if request.approved_at is not None:
                raise FailedPrecondition(f"join request {fingerprint} is approved already "
                                         f"(by {request.approved_by})")
            return request
    raise NotFound(f"no pending join request with fingerprint {fingerprint} (expired, or "
                   "never made: `ticket-authority cluster list`)")


def approve(officer: Officer, store: Store, fingerprint: str, approver: str,
            now: float) -> JoinRequest:
    """``cluster approve``: wrap the current KEK to the request's transport key in this
    member's token and attach it to the request. Returns the request as it was.

    Raises: NotFound, FailedPrecondition (approved already, the name was taken meanwhile, the
    KEK changed meanwhile, this token lacks the current KEK), InvalidArgument (a public key the
    token refuses), DeviceUnavailable.
    """
    request = pending(store, fingerprint, now)
    _check_fingerprint(request.public_key, request.fingerprint,
                       f"join request of {request.node_name!r}")
    kek_id = _current(store)
    wrapped = officer.wrap_kek_for(request.public_key, kek_id, request.oaep_hashes)
    if not store.approve_join(request.fingerprint, wrapped.blob, wrapped.oaep_hash, approver,
                              now, kek_id=kek_id):
        raise FailedPrecondition(f"join request {request.fingerprint} changed meanwhile (approved, "
                                 "expired, its name taken, or the KEK replaced): list and retry")
    log.info("join of %r (%s) approved by %s", request.node_name, request.fingerprint, approver)
    return request


@dataclass(frozen=True)
class Removal:
    """What ``remove`` did: the node removed, the new KEK, the members it was delivered to."""

    removed: NodeRecord
    kek_id: str
    delivered_to: tuple[str, ...]


def remove(officer: Officer, store: Store, name: str, maker: str, now: float) -> Removal:
    """``cluster remove``: replace the KEK (made in this member's token, wrapped to every
    remaining member's transport key) and drop the node, in one store transaction.

    Raises: NotFound (no such member), FailedPrecondition (removing this node itself; the
    membership changed meanwhile: the new KEK is destroyed), DeviceUnavailable.
    """
    members = {n.name: n for n in store.list_nodes()}
    if name not in members:
        raise NotFound(f"no member named {name!r} (`ticket-authority cluster list`)")
    if name == maker:
        raise FailedPrecondition("a node cannot remove itself: run the removal on another "
                                 "member")
    if maker not in members:
        raise FailedPrecondition(f"this node ({maker!r}) is not a member")
    kek_id = f"{FIRST_KEK}-{secrets.token_hex(4)}"
    officer.make_kek(kek_id)
    try:
        deliveries = _deliveries(officer, members.values(), kek_id, {name, maker})
        done = store.replace_kek(name, maker, kek_id, deliveries, now)
    except BaseException:
        officer.destroy_kek(kek_id)
        raise
    if not done:
        officer.destroy_kek(kek_id)
        raise FailedPrecondition("the membership changed meanwhile; list and retry")
    log.info("node %r removed; KEK %r replaces the cluster KEK", name, kek_id)
    return Removal(members[name], kek_id, tuple(sorted(deliveries)))


def _deliveries(officer: Officer, members: Any, kek_id: str,
                skip: set[str]) -> dict[str, tuple[bytes, str]]:
    """The new KEK wrapped to each member's transport key but those of ``skip``."""
    out: dict[str, tuple[bytes, str]] = {}
    for node in members:
        if node.name in skip:
            continue
        _check_fingerprint(node.public_key, node.fingerprint, f"member {node.name!r}")
        wrapped = officer.wrap_kek_for(node.public_key, kek_id, node.oaep_hashes)
        out[node.name] = (wrapped.blob, wrapped.oaep_hash)
    return out


def receive_kek(officer: Officer, store: Store, name: str) -> str | None:
    """A member's heartbeat: unwrap the KEK delivered to this node, if one waits, with its
    transport key, and acknowledge it. Returns the KEK id received, or None.

    Raises: FailedPrecondition (this node is not a member, or its token lacks its transport
    key), InvalidArgument (a blob the token refuses), DeviceUnavailable.
    """
    delivery = store.kek_delivery(name)
    if delivery is None:
        return None
    me = member(store, name)
    officer.unwrap_kek(_wrapped(delivery.wrapped_kek, delivery.oaep_hash), delivery.kek_id,
                      me.fingerprint)
    if not store.kek_received(name, delivery.kek_id):
        log.warning("the delivery of KEK %r to %r vanished after its unwrap", delivery.kek_id,
                    name)
    log.info("KEK %r received into this node's token", delivery.kek_id)
    return str(delivery.kek_id)


def member(store: Store, name: str) -> NodeRecord:
    """This node's member record. Raises: FailedPrecondition (not a member), DeviceUnavailable."""
    for node in store.list_nodes():
        if node.name == name:
            return node
    raise FailedPrecondition(f"node {name!r} is not a member of the cluster: run `ticket-"
                             "authority cluster init` (first node) or `cluster join`")


def _check_fingerprint(der: bytes, fingerprint: str, whose: str) -> None:
    """The KEK is wrapped only to a key whose SHA-256 is the fingerprint an operator approved
    (a stored key swapped without its fingerprint is refused). Raises: FailedPrecondition."""
    if hashlib.sha256(der).hexdigest() != fingerprint:
        raise FailedPrecondition(f"the stored transport key of the {whose} does not match its "
                                 f"fingerprint {fingerprint}: the database was changed; "
                                 "nothing wrapped")


def _current(store: Store) -> str:
    kek_id = store.cluster_kek()
    if kek_id is None:
        raise FailedPrecondition("no cluster yet: run `ticket-authority cluster init`")
    return kek_id


def _wrapped(blob: bytes, oaep_hash: str) -> Any:
    from authority.backends.pkcs11._wrap import WrappedKek

    return WrappedKek(blob, oaep_hash)


class ChildOfficer:
    """An :class:`Officer` whose every call runs in a child process of its own
    (``officer_process.run_officer``): the server's user login stays untouched."""

    def __init__(self, settings: Pkcs11Settings, so_pin: Secret, timeout: float = 60.0) -> None:
        self._settings = settings
        self._so_pin = so_pin
        self._timeout = timeout

    def _run(self, method: str, *args: Any) -> Any:
        from authority.backends.pkcs11.officer_process import run_officer

        return run_officer(self._settings, self._so_pin, method, *args, timeout=self._timeout)

    def make_kek(self, label: str) -> None:
        self._run("make_kek", label)

    def has_kek(self, label: str) -> bool:
        return bool(self._run("has_kek", label))

    def destroy_kek(self, label: str) -> bool:
        return bool(self._run("destroy_kek", label))

    def kek_labels(self) -> list[str]:
        return list(self._run("kek_labels"))

    def new_transport_key(self, persistent: bool = False) -> Any:
        raise DeviceUnavailable("a transport key is made by `cluster join`, not by the server")

    def drop_transport_key(self, fingerprint: str) -> bool:
        return bool(self._run("drop_transport_key", fingerprint))

    def wrap_kek_for(self, public_key_der: bytes, label: str,
                     oaep_hashes: tuple[str, ...]) -> Any:
        return self._run("wrap_kek_for", public_key_der, label, tuple(oaep_hashes))

    def unwrap_kek(self, wrapped: Any, label: str, fingerprint: str | None = None) -> None:
        self._run("unwrap_kek", wrapped, label, fingerprint)


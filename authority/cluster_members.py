"""This replica's part in the membership of per-node tokens (``cluster.per_node_tokens``): the
admin operations it serves (list, approve, remove: audited) and what its heartbeat does (take a
KEK delivered to it, re-wrap its original keys under the current KEK). The operations are in
authority/membership.py; the security officer's work runs in a child process per call
(``ChildOfficer``)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from authority import membership
from authority.audit import AuditHook
from authority.clock import Clock
from authority.config import Config
from authority.errors import FailedPrecondition, StartupError
from authority.keyring import KeyRing
from authority.keyring.core import Wrapping
from authority.membership import ChildOfficer, Officer, Removal
from authority.store.base import JoinRequest, NodeRecord, Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Membership:
    """What ``ListClusterNodes`` answers."""

    kek_id: str | None
    nodes: list[NodeRecord]
    requests: list[JoinRequest]


class ClusterMembers:
    """The membership operations of one replica. Thread-safe: one operation at a time."""

    def __init__(self, config: Config, store: Store, ring: KeyRing, wrapper: Wrapping,
                 clock: Clock, audit: AuditHook,
                 officer: Callable[[], Officer] | None = None) -> None:
        self.name = membership.node_name(config)
        self._config = config
        self._store = store
        self._ring = ring
        self._wrapper = wrapper
        self._clock = clock
        self._audit = audit
        self._officer = officer or self._child_officer
        self._lock = threading.Lock()
        self._rewrapped_for: str | None = None
        self._in_use_seen: set[str] | None = None   # kek_ids_in_use at the last KEK cleanup
        self._told_removed = False

    def _child_officer(self) -> Officer:
        settings, so_pin = membership.so_settings(self._config)
        return ChildOfficer(settings, so_pin)

    def check_member(self) -> None:
        """At start: this node must be a member, and its token must hold the KEK the store
        says it received (what names a member's device: the shared store records no single
        device owner with per-node tokens, authority/statedir.py ``claim``).

        Raises: StartupError (not a member, or another token: the message says what to do),
        DeviceUnavailable.
        """
        nodes = {n.name: n for n in self._store.list_nodes()}
        me = nodes.get(self.name)
        if me is None:
            raise StartupError(
                f"cluster.per_node_tokens: node {self.name!r} (cluster.node_name) is not a "
                "member of the cluster: run `ticket-authority cluster init` on the first node, "
                "`ticket-authority cluster join` on the others (members: "
                f"{', '.join(nodes) or 'none'})")
        try:
            self._wrapper.kek_attributes(me.kek_id)
        except FailedPrecondition as exc:
            raise StartupError(
                f"cluster.per_node_tokens: node {self.name!r} is a member, but its token lacks "
                f"the cluster KEK {me.kek_id!r} it received ({exc.message}): is this the "
                "node's token? (a removed or rebuilt node joins again)") from exc

    def list(self) -> Membership:
        """The current KEK, the members and the join requests. Raises: DeviceUnavailable."""
        now = self._clock.now()
        return Membership(self._store.cluster_kek(), self._store.list_nodes(),
                          self._store.list_join_requests(now))

    def approve(self, fingerprint: str, actor: str) -> tuple[JoinRequest, str]:
        """Approve a pending join request (audited before the KEK is wrapped). Returns the
        request and the KEK id wrapped to it.

        Raises: NotFound, FailedPrecondition, InvalidArgument, DeviceUnavailable,
        AuditUnavailable."""
        with self._lock:
            now = self._clock.now()
            request = membership.pending(self._store, fingerprint, now)
            kek_id = self._store.cluster_kek() or ""
            self._audit(actor, "cluster.join_approved", {
                "fingerprint": request.fingerprint, "node": request.node_name,
                "kek_id": kek_id, "approver_node": self.name})
            membership.approve(self._officer(), self._store, request.fingerprint, actor, now)
            return request, kek_id

    def remove(self, name: str, actor: str, rotate: bool = True) -> tuple[Removal, bytes | None]:
        """Remove a member under a new KEK (audited first); then, unless ``rotate`` is False,
        rotate so that new tickets are sealed under a key the removed node never held. Returns
        what was done and the new key's id (None without rotation).

        Raises: NotFound, FailedPrecondition, DeviceUnavailable, AuditUnavailable."""
        with self._lock:
            targets = {n.name: n.fingerprint for n in self._store.list_nodes()
                       if n.name not in (name, self.name)}
            self._audit(actor, "cluster.node_removed", {
                "node": name, "by_node": self.name, "rotate": rotate,
                "new_kek_wrapped_to": targets})
            done = membership.remove(self._officer(), self._store, name, self.name,
                                     self._clock.now())
        new = None
        if rotate:
            record, _ = self._ring.rotate(reason=f"cluster node {name} removed", actor=actor)
            new = record.key_id
        return done, new

    def tick(self) -> None:
        """The heartbeat's part: unwrap a KEK delivered to this node, re-wrap under the
        current KEK the blobs of the keys whose original this token holds, and destroy the
        KEKs of this token that nothing stored needs any more (a KEK and an old blob would
        bring a destroyed key back).

        Raises: AuthorityError from the device or store (the next heartbeat tries again)."""
        with self._lock:
            if self._store.kek_delivery(self.name) is not None:
                membership.receive_kek(self._officer(), self._store, self.name)
            current = self._store.cluster_kek()
            if current is not None and current != self._rewrapped_for:
                me = [n for n in self._store.list_nodes() if n.name == self.name]
                if not me:
                    self._removed_warning()
                    return
                if me[0].kek_id != current:
                    return            # this token does not hold it yet
                self._ring.rewrap(current)
                self._rewrapped_for = current
            self._retire_keks()

    def _removed_warning(self) -> None:
        """Log, once, that this node is no longer a member (it keeps serving with the keys it
        holds, cannot unwrap new ones, and keeps new keys PENDING until keys.publish_delay
        while it is live: stop it). Never raises."""
        if not self._told_removed:
            self._told_removed = True
            log.error("node %r was removed from the cluster: it cannot unwrap keys made from "
                      "now on; stop it (`cluster join` makes it a member again)", self.name)

    def _retire_keks(self) -> None:
        """Destroy this token's KEKs that are not in use (``Store.kek_ids_in_use``: the
        current one, one a blob, a delivery or a member names); only when that set changed
        since the last look (the look is an SO child process). Raises: AuthorityError."""
        in_use = self._store.kek_ids_in_use()
        if in_use == self._in_use_seen:
            return
        officer = self._officer()
        for label in officer.kek_labels():
            if label not in in_use and officer.destroy_kek(label):
                log.info("cluster KEK %r destroyed in this node's token: no stored blob, "
                         "delivery or member needs it", label)
        self._in_use_seen = in_use

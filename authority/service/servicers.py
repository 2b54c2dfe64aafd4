"""The gRPC servicers: translate, call the domain, translate back. Errors go to the interceptor."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc

from authority import __version__
from authority._proto.ticketauthority.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    authority_pb2,
    authority_pb2_grpc,
)
from authority.app import Authority
from authority.cluster import MAINTENANCE
from authority.cluster_members import ClusterMembers
from authority.errors import AuthorityError, DeviceUnavailable, FailedPrecondition
from authority.keys import KeyState
from authority.sealer import IssuedTicket, Redemption
from authority.service import cluster_convert, convert
from authority.service.auth import UNRESTRICTED, RealmCheck, RealmLimits, caller_identity
from authority.state import ResumptionState
from authority.steps import Plan, run


class TicketAuthorityServicer(authority_pb2_grpc.TicketAuthorityServicer):
    """Issue, redeem and consume tickets for gateways, one at a time or in batches."""

    def __init__(self, authority: Authority) -> None:
        self._sealer = authority.sealer
        self._device = authority.backend
        self._max_batch = authority.config.server.max_batch_items
        self._realm_limits = RealmLimits.from_settings(authority.config.tls)

    def _realms(self, context: grpc.ServicerContext) -> RealmCheck:
        """Which realms this call's gateway may use (``tls.realms``)."""
        if self._realm_limits is None:
            return UNRESTRICTED
        return self._realm_limits.checker(context)

    def IssueTicket(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        self._realms(context).check(request.realm)
        issued = self._sealer.issue(convert.state_from_proto(request), request.lifetime_seconds,
                                    request.realm)
        return convert.issue_response(issued)

    def RedeemTicket(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        self._realms(context).check(request.realm)
        return convert.redeem_response(self._sealer.redeem(request.ticket, request.consume,
                                                           request.realm))

    def ConsumeTicket(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        status = self._sealer.consume(request.ticket_id)
        return authority_pb2.ConsumeTicketResponse(result=convert.result_name(status))

    def ConsumeTickets(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        convert.check_batch(len(request.items), self._max_batch)
        results = self._sealer.consume_many([item.ticket_id for item in request.items])
        return convert.consume_batch_response(results, request.batch_id)

    def IssueTickets(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        return run(self.issue_tickets_plan(request, context), self._device)

    def RedeemTickets(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        return run(self.redeem_tickets_plan(request, context), self._device)

    def issue_tickets_plan(self, request: Any, context: grpc.ServicerContext) -> Plan[Any]:
        """IssueTickets as a plan (authority/steps.py), for the aio server to drive.
        Raises: InvalidArgument (batch size), DeviceUnavailable, ResourceExhausted."""
        convert.check_batch(len(request.items), self._max_batch)
        results = yield from self._issue_batch(request.items, self._realms(context))
        return convert.issue_batch_response(results, request.batch_id)

    def redeem_tickets_plan(self, request: Any, context: grpc.ServicerContext) -> Plan[Any]:
        """RedeemTickets as a plan (authority/steps.py), for the aio server to drive.
        Raises: InvalidArgument (batch size), DeviceUnavailable."""
        convert.check_batch(len(request.items), self._max_batch)
        results = yield from self._redeem_batch(request.items, self._realms(context))
        return convert.redeem_batch_response(results, request.batch_id)

    def IssueTicketStream(self, requests: Iterator[Any],  # noqa: N802
                          context: grpc.ServicerContext) -> Iterator[Any]:
        for request in requests:
            yield self.IssueTickets(request, context)

    def RedeemTicketStream(self, requests: Iterator[Any],  # noqa: N802
                           context: grpc.ServicerContext) -> Iterator[Any]:
        for request in requests:
            yield self.RedeemTickets(request, context)

    def _issue_batch(self, items: Any, realms: RealmCheck
                     ) -> Plan[list[IssuedTicket | AuthorityError]]:
        """Missing states and refused realms fail their own item; the rest are sealed in one
        batch."""
        states: list[tuple[int, ResumptionState, int]] = []
        out: list[IssuedTicket | AuthorityError | None] = [None] * len(items)
        for index, item in enumerate(items):
            out[index] = realms.refusal(item.realm, f"items[{index}].realm")
            if out[index] is not None:
                continue
            try:
                states.append((index, convert.state_from_proto(item, f"items[{index}].state"),
                               item.lifetime_seconds))
            except AuthorityError as exc:
                out[index] = exc
        sealed = yield from self._sealer.issue_plan(
            [(s, life) for _, s, life in states], field=lambda n: f"items[{states[n][0]}].state",
            realms=[items[i].realm for i, _, _ in states])
        for (index, _, _), result in zip(states, sealed, strict=True):
            out[index] = result
        return [r for r in out if r is not None]

    def _redeem_batch(self, items: Any, realms: RealmCheck
                      ) -> Plan[list[Redemption | AuthorityError]]:
        """Items naming a realm the caller may not use fail alone; the rest redeem in one
        batch."""
        if realms.allowed is None:  # nothing to refuse (the usual case): skip the bookkeeping
            return list((yield from self._sealer.redeem_plan(
                [(i.ticket, i.consume) for i in items], realms=[i.realm for i in items])))
        out: list[Redemption | AuthorityError | None] = [
            realms.refusal(item.realm, f"items[{index}].realm") for index, item in enumerate(items)]
        allowed = [index for index, refused in enumerate(out) if refused is None]
        results = yield from self._sealer.redeem_plan(
            [(items[i].ticket, items[i].consume) for i in allowed],
            field=lambda n: f"items[{allowed[n]}].ticket", realms=[items[i].realm for i in allowed])
        for index, result in zip(allowed, results, strict=True):
            out[index] = result
        return [r for r in out if r is not None]


class TicketAdminServicer(admin_pb2_grpc.TicketAdminServicer):
    """Key lifecycle and status for operators."""

    def __init__(self, authority: Authority) -> None:
        self._authority = authority
        self._ring = authority.ring

    def RotateKey(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        new, previous = self._ring.rotate(reason="operator", actor=caller_identity(context))
        reply = admin_pb2.RotateKeyResponse(new_key=convert.key_info(new, self._ring))
        if previous is not None:
            reply.previous_key.CopyFrom(convert.key_info(previous, self._ring))
        return reply

    def ListKeys(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        records = [r for r in self._ring.records()
                   if request.include_destroyed or r.state != KeyState.DESTROYED]
        return admin_pb2.ListKeysResponse(keys=[convert.key_info(r, self._ring) for r in records])

    def RetireKey(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        record = self._ring.retire(convert.key_id_from_text(request.key_id),
                                   actor=caller_identity(context))
        return admin_pb2.RetireKeyResponse(key=convert.key_info(record, self._ring))

    def RevokeTickets(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        kind, value, issued_before = convert.revocation_selector(request)
        record = self._authority.policy.revoke(kind, value, issued_before, request.reason,
                                               actor=caller_identity(context))
        return admin_pb2.RevokeTicketsResponse(revocation_id=record.revocation_id,
                                               expires_at=convert.timestamp(record.expires_at))

    def ListRevocations(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        return admin_pb2.ListRevocationsResponse(revocations=[
            convert.revocation_info(r) for r in self._authority.policy.revocations()])

    def BumpPolicyEpoch(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        epoch = self._authority.policy.bump_epoch(request.realm, actor=caller_identity(context))
        return admin_pb2.BumpPolicyEpochResponse(realm=request.realm, policy_epoch=epoch)

    def ListRealms(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        return admin_pb2.ListRealmsResponse(realms=[
            admin_pb2.RealmPolicy(realm=realm, policy_epoch=epoch)
            for realm, epoch in sorted(self._authority.policy.epochs().items())])

    def ListClusterNodes(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        members = self._members()
        return cluster_convert.cluster_listing(members.list(), members.name)

    def ApproveClusterJoin(self, request: Any,  # noqa: N802
                           context: grpc.ServicerContext) -> Any:
        fingerprint = cluster_convert.fingerprint_field(request.fingerprint)
        joiner, kek_id = self._members().approve(fingerprint, caller_identity(context))
        return admin_pb2.ApproveClusterJoinResponse(request=cluster_convert.join_request(joiner),
                                                    kek_id=kek_id)

    def RemoveClusterNode(self, request: Any,  # noqa: N802
                          context: grpc.ServicerContext) -> Any:
        name = cluster_convert.node_name_field(request.name)
        done, new_key = self._members().remove(name, caller_identity(context),
                                               rotate=not request.keep_sealing_key)
        return admin_pb2.RemoveClusterNodeResponse(
            removed=cluster_convert.cluster_node(done.removed, ""), kek_id=done.kek_id,
            delivered_to=list(done.delivered_to),
            new_sealing_key_id=new_key.hex() if new_key else "")

    def _members(self) -> ClusterMembers:
        if self._authority.members is None:
            raise FailedPrecondition("cluster.per_node_tokens is off on this server: replicas "
                                     "sharing one token have no cluster membership")
        return self._authority.members

    def GetStatus(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        a = self._authority
        info = a.backend.describe()
        states = [r.state for r in self._ring.records()]
        primary = self._ring.primary_id
        store = a.store.describe()
        reply = admin_pb2.GetStatusResponse(
            backend=info.backend, library=info.library, token=info.token,
            sealing_key_id=primary.hex() if primary else "",
            active_keys=states.count(KeyState.ACTIVE),
            decrypt_only_keys=states.count(KeyState.DECRYPT_ONLY),
            destroyed_keys=states.count(KeyState.DESTROYED), version=__version__,
            started_at=convert.timestamp(a.started_at), counters=a.counters.snapshot(),
            sessions=info.sessions, device_processes=info.processes,
            store=store.kind, store_location=store.location,
            store_schema_version=store.schema_version,
            policy_age_seconds=min(a.policy.confirmed_age(), 1e9),
            max_staleness_seconds=a.policy.max_staleness or 0.0,
            replica_id=a.replica.replica_id)
        self._cluster_status(reply)
        return reply

    def _cluster_status(self, reply: Any) -> None:
        """The consumed count, replicas and lease, read from the store now; if it fails,
        ``store_reachable`` false and why (the rest of the status still answers)."""
        a = self._authority
        now = a.clock.now()
        reply.server_time.CopyFrom(convert.timestamp(now))
        try:
            consumed = a.store.consumed_count(now)
            replicas = a.store.load_replicas()
            lease = a.store.load_lease(MAINTENANCE)
        except DeviceUnavailable as exc:
            reply.store_reachable = False
            reply.store_error = exc.message
            return
        reply.store_reachable = True
        reply.consumed_tickets = consumed
        timeout = a.config.cluster.replica_timeout
        reply.replicas.extend(convert.replica_status(r, lease, now, timeout,
                                                     a.replica.replica_id) for r in replicas)
        if lease is not None:
            reply.maintenance_lease.CopyFrom(convert.lease_status(lease, now))

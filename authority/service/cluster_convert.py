"""Cluster membership messages (ListClusterNodes, ApproveClusterJoin, RemoveClusterNode) to and
from the domain; request validation names the field."""

from __future__ import annotations

from authority._proto.ticketauthority.v1 import admin_pb2
from authority.cluster_members import Membership
from authority.errors import InvalidArgument
from authority.membership import fingerprint_text
from authority.service.convert import timestamp
from authority.store.base import JoinRequest, NodeRecord

NODE_NAME_MAX = 253


def fingerprint_field(text: str) -> str:
    """A transport key fingerprint as given (64 hex digits, ``:`` and spaces ignored, any case),
    in lower case. Raises: InvalidArgument naming ``fingerprint``."""
    value = fingerprint_text(text)
    if value is None:
        raise InvalidArgument("fingerprint", "must be the 64 hex digits of the SHA-256 "
                                             "fingerprint `cluster join` printed")
    return value


def node_name_field(text: str) -> str:
    """A member's name. Raises: InvalidArgument naming ``name``."""
    if not text or len(text) > NODE_NAME_MAX or "," in text or not text.isprintable():
        raise InvalidArgument("name", f"a member's name: 1 to {NODE_NAME_MAX} printable "
                                      "characters without a comma")
    return text


def cluster_node(node: NodeRecord, me: str) -> admin_pb2.ClusterNode:
    """A member as a message; ``me`` is the answering node's name."""
    return admin_pb2.ClusterNode(name=node.name, fingerprint=node.fingerprint,
                                 approved_by=node.approved_by,
                                 joined_at=timestamp(node.joined_at), kek_id=node.kek_id,
                                 this_node=node.name == me)


def join_request(request: JoinRequest) -> admin_pb2.ClusterJoinRequest:
    """A join request as a message (never its key or wrapped KEK)."""
    return admin_pb2.ClusterJoinRequest(
        fingerprint=request.fingerprint, node_name=request.node_name,
        requested_at=timestamp(request.requested_at),
        approved=request.approved_at is not None, approved_by=request.approved_by or "",
        expires_at=timestamp(request.expires_at))


def cluster_listing(listing: Membership, me: str) -> admin_pb2.ListClusterNodesResponse:
    """ListClusterNodes' answer."""
    return admin_pb2.ListClusterNodesResponse(
        kek_id=listing.kek_id or "", nodes=[cluster_node(n, me) for n in listing.nodes],
        join_requests=[join_request(r) for r in listing.requests])

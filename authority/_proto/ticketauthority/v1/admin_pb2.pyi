import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class KeyState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KEY_STATE_UNSPECIFIED: _ClassVar[KeyState]
    KEY_STATE_ACTIVE: _ClassVar[KeyState]
    KEY_STATE_DECRYPT_ONLY: _ClassVar[KeyState]
    KEY_STATE_DESTROYED: _ClassVar[KeyState]
    KEY_STATE_MISSING: _ClassVar[KeyState]
    KEY_STATE_PENDING: _ClassVar[KeyState]
KEY_STATE_UNSPECIFIED: KeyState
KEY_STATE_ACTIVE: KeyState
KEY_STATE_DECRYPT_ONLY: KeyState
KEY_STATE_DESTROYED: KeyState
KEY_STATE_MISSING: KeyState
KEY_STATE_PENDING: KeyState

class KeyInfo(_message.Message):
    __slots__ = ("key_id", "state", "created_at", "opens_until", "sealing_ended_at", "destroyed_at", "seal_count", "rotates_at")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    OPENS_UNTIL_FIELD_NUMBER: _ClassVar[int]
    SEALING_ENDED_AT_FIELD_NUMBER: _ClassVar[int]
    DESTROYED_AT_FIELD_NUMBER: _ClassVar[int]
    SEAL_COUNT_FIELD_NUMBER: _ClassVar[int]
    ROTATES_AT_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    state: KeyState
    created_at: _timestamp_pb2.Timestamp
    opens_until: _timestamp_pb2.Timestamp
    sealing_ended_at: _timestamp_pb2.Timestamp
    destroyed_at: _timestamp_pb2.Timestamp
    seal_count: int
    rotates_at: _timestamp_pb2.Timestamp
    def __init__(self, key_id: _Optional[str] = ..., state: _Optional[_Union[KeyState, str]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., opens_until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., sealing_ended_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., destroyed_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., seal_count: _Optional[int] = ..., rotates_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class RotateKeyRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RotateKeyResponse(_message.Message):
    __slots__ = ("new_key", "previous_key")
    NEW_KEY_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_KEY_FIELD_NUMBER: _ClassVar[int]
    new_key: KeyInfo
    previous_key: KeyInfo
    def __init__(self, new_key: _Optional[_Union[KeyInfo, _Mapping]] = ..., previous_key: _Optional[_Union[KeyInfo, _Mapping]] = ...) -> None: ...

class ListKeysRequest(_message.Message):
    __slots__ = ("include_destroyed",)
    INCLUDE_DESTROYED_FIELD_NUMBER: _ClassVar[int]
    include_destroyed: bool
    def __init__(self, include_destroyed: _Optional[bool] = ...) -> None: ...

class ListKeysResponse(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedCompositeFieldContainer[KeyInfo]
    def __init__(self, keys: _Optional[_Iterable[_Union[KeyInfo, _Mapping]]] = ...) -> None: ...

class RetireKeyRequest(_message.Message):
    __slots__ = ("key_id",)
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    def __init__(self, key_id: _Optional[str] = ...) -> None: ...

class RetireKeyResponse(_message.Message):
    __slots__ = ("key",)
    KEY_FIELD_NUMBER: _ClassVar[int]
    key: KeyInfo
    def __init__(self, key: _Optional[_Union[KeyInfo, _Mapping]] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetStatusResponse(_message.Message):
    __slots__ = ("backend", "library", "token", "sealing_key_id", "active_keys", "decrypt_only_keys", "destroyed_keys", "consumed_tickets", "version", "started_at", "counters", "sessions", "device_processes", "store", "store_location", "store_schema_version", "store_reachable", "store_error", "policy_age_seconds", "max_staleness_seconds", "replica_id", "replicas", "maintenance_lease", "server_time")
    class CountersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    LIBRARY_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    SEALING_KEY_ID_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_KEYS_FIELD_NUMBER: _ClassVar[int]
    DECRYPT_ONLY_KEYS_FIELD_NUMBER: _ClassVar[int]
    DESTROYED_KEYS_FIELD_NUMBER: _ClassVar[int]
    CONSUMED_TICKETS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_PROCESSES_FIELD_NUMBER: _ClassVar[int]
    STORE_FIELD_NUMBER: _ClassVar[int]
    STORE_LOCATION_FIELD_NUMBER: _ClassVar[int]
    STORE_SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    STORE_REACHABLE_FIELD_NUMBER: _ClassVar[int]
    STORE_ERROR_FIELD_NUMBER: _ClassVar[int]
    POLICY_AGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MAX_STALENESS_SECONDS_FIELD_NUMBER: _ClassVar[int]
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    MAINTENANCE_LEASE_FIELD_NUMBER: _ClassVar[int]
    SERVER_TIME_FIELD_NUMBER: _ClassVar[int]
    backend: str
    library: str
    token: str
    sealing_key_id: str
    active_keys: int
    decrypt_only_keys: int
    destroyed_keys: int
    consumed_tickets: int
    version: str
    started_at: _timestamp_pb2.Timestamp
    counters: _containers.ScalarMap[str, int]
    sessions: int
    device_processes: int
    store: str
    store_location: str
    store_schema_version: int
    store_reachable: bool
    store_error: str
    policy_age_seconds: float
    max_staleness_seconds: float
    replica_id: str
    replicas: _containers.RepeatedCompositeFieldContainer[ReplicaStatus]
    maintenance_lease: LeaseStatus
    server_time: _timestamp_pb2.Timestamp
    def __init__(self, backend: _Optional[str] = ..., library: _Optional[str] = ..., token: _Optional[str] = ..., sealing_key_id: _Optional[str] = ..., active_keys: _Optional[int] = ..., decrypt_only_keys: _Optional[int] = ..., destroyed_keys: _Optional[int] = ..., consumed_tickets: _Optional[int] = ..., version: _Optional[str] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., counters: _Optional[_Mapping[str, int]] = ..., sessions: _Optional[int] = ..., device_processes: _Optional[int] = ..., store: _Optional[str] = ..., store_location: _Optional[str] = ..., store_schema_version: _Optional[int] = ..., store_reachable: _Optional[bool] = ..., store_error: _Optional[str] = ..., policy_age_seconds: _Optional[float] = ..., max_staleness_seconds: _Optional[float] = ..., replica_id: _Optional[str] = ..., replicas: _Optional[_Iterable[_Union[ReplicaStatus, _Mapping]]] = ..., maintenance_lease: _Optional[_Union[LeaseStatus, _Mapping]] = ..., server_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ReplicaStatus(_message.Message):
    __slots__ = ("replica_id", "host", "pid", "started_at", "last_heartbeat", "ring_version", "live", "holds_lease", "this_replica")
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    RING_VERSION_FIELD_NUMBER: _ClassVar[int]
    LIVE_FIELD_NUMBER: _ClassVar[int]
    HOLDS_LEASE_FIELD_NUMBER: _ClassVar[int]
    THIS_REPLICA_FIELD_NUMBER: _ClassVar[int]
    replica_id: str
    host: str
    pid: int
    started_at: _timestamp_pb2.Timestamp
    last_heartbeat: _timestamp_pb2.Timestamp
    ring_version: int
    live: bool
    holds_lease: bool
    this_replica: bool
    def __init__(self, replica_id: _Optional[str] = ..., host: _Optional[str] = ..., pid: _Optional[int] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_heartbeat: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., ring_version: _Optional[int] = ..., live: _Optional[bool] = ..., holds_lease: _Optional[bool] = ..., this_replica: _Optional[bool] = ...) -> None: ...

class LeaseStatus(_message.Message):
    __slots__ = ("holder", "epoch", "expires_at", "expired")
    HOLDER_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRED_FIELD_NUMBER: _ClassVar[int]
    holder: str
    epoch: int
    expires_at: _timestamp_pb2.Timestamp
    expired: bool
    def __init__(self, holder: _Optional[str] = ..., epoch: _Optional[int] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expired: _Optional[bool] = ...) -> None: ...

class SaSelector(_message.Message):
    __slots__ = ("spi_i", "spi_r")
    SPI_I_FIELD_NUMBER: _ClassVar[int]
    SPI_R_FIELD_NUMBER: _ClassVar[int]
    spi_i: bytes
    spi_r: bytes
    def __init__(self, spi_i: _Optional[bytes] = ..., spi_r: _Optional[bytes] = ...) -> None: ...

class RevokeTicketsRequest(_message.Message):
    __slots__ = ("id_i", "old_sa", "ticket_id", "issued_before", "reason")
    ID_I_FIELD_NUMBER: _ClassVar[int]
    OLD_SA_FIELD_NUMBER: _ClassVar[int]
    TICKET_ID_FIELD_NUMBER: _ClassVar[int]
    ISSUED_BEFORE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    id_i: bytes
    old_sa: SaSelector
    ticket_id: bytes
    issued_before: _timestamp_pb2.Timestamp
    reason: str
    def __init__(self, id_i: _Optional[bytes] = ..., old_sa: _Optional[_Union[SaSelector, _Mapping]] = ..., ticket_id: _Optional[bytes] = ..., issued_before: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., reason: _Optional[str] = ...) -> None: ...

class Revocation(_message.Message):
    __slots__ = ("revocation_id", "kind", "value", "issued_before", "created_at", "expires_at", "reason")
    REVOCATION_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    ISSUED_BEFORE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    revocation_id: int
    kind: str
    value: bytes
    issued_before: _timestamp_pb2.Timestamp
    created_at: _timestamp_pb2.Timestamp
    expires_at: _timestamp_pb2.Timestamp
    reason: str
    def __init__(self, revocation_id: _Optional[int] = ..., kind: _Optional[str] = ..., value: _Optional[bytes] = ..., issued_before: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., reason: _Optional[str] = ...) -> None: ...

class RevokeTicketsResponse(_message.Message):
    __slots__ = ("revocation_id", "expires_at")
    REVOCATION_ID_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    revocation_id: int
    expires_at: _timestamp_pb2.Timestamp
    def __init__(self, revocation_id: _Optional[int] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ListRevocationsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListRevocationsResponse(_message.Message):
    __slots__ = ("revocations",)
    REVOCATIONS_FIELD_NUMBER: _ClassVar[int]
    revocations: _containers.RepeatedCompositeFieldContainer[Revocation]
    def __init__(self, revocations: _Optional[_Iterable[_Union[Revocation, _Mapping]]] = ...) -> None: ...

class BumpPolicyEpochRequest(_message.Message):
    __slots__ = ("realm",)
    REALM_FIELD_NUMBER: _ClassVar[int]
    realm: str
    def __init__(self, realm: _Optional[str] = ...) -> None: ...

class BumpPolicyEpochResponse(_message.Message):
    __slots__ = ("realm", "policy_epoch")
    REALM_FIELD_NUMBER: _ClassVar[int]
    POLICY_EPOCH_FIELD_NUMBER: _ClassVar[int]
    realm: str
    policy_epoch: int
    def __init__(self, realm: _Optional[str] = ..., policy_epoch: _Optional[int] = ...) -> None: ...

class RealmPolicy(_message.Message):
    __slots__ = ("realm", "policy_epoch")
    REALM_FIELD_NUMBER: _ClassVar[int]
    POLICY_EPOCH_FIELD_NUMBER: _ClassVar[int]
    realm: str
    policy_epoch: int
    def __init__(self, realm: _Optional[str] = ..., policy_epoch: _Optional[int] = ...) -> None: ...

class ListRealmsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListRealmsResponse(_message.Message):
    __slots__ = ("realms",)
    REALMS_FIELD_NUMBER: _ClassVar[int]
    realms: _containers.RepeatedCompositeFieldContainer[RealmPolicy]
    def __init__(self, realms: _Optional[_Iterable[_Union[RealmPolicy, _Mapping]]] = ...) -> None: ...

class ClusterNode(_message.Message):
    __slots__ = ("name", "fingerprint", "approved_by", "joined_at", "kek_id", "this_node")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    APPROVED_BY_FIELD_NUMBER: _ClassVar[int]
    JOINED_AT_FIELD_NUMBER: _ClassVar[int]
    KEK_ID_FIELD_NUMBER: _ClassVar[int]
    THIS_NODE_FIELD_NUMBER: _ClassVar[int]
    name: str
    fingerprint: str
    approved_by: str
    joined_at: _timestamp_pb2.Timestamp
    kek_id: str
    this_node: bool
    def __init__(self, name: _Optional[str] = ..., fingerprint: _Optional[str] = ..., approved_by: _Optional[str] = ..., joined_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., kek_id: _Optional[str] = ..., this_node: _Optional[bool] = ...) -> None: ...

class ClusterJoinRequest(_message.Message):
    __slots__ = ("fingerprint", "node_name", "requested_at", "approved", "approved_by", "expires_at")
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    NODE_NAME_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_AT_FIELD_NUMBER: _ClassVar[int]
    APPROVED_FIELD_NUMBER: _ClassVar[int]
    APPROVED_BY_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    fingerprint: str
    node_name: str
    requested_at: _timestamp_pb2.Timestamp
    approved: bool
    approved_by: str
    expires_at: _timestamp_pb2.Timestamp
    def __init__(self, fingerprint: _Optional[str] = ..., node_name: _Optional[str] = ..., requested_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., approved: _Optional[bool] = ..., approved_by: _Optional[str] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ListClusterNodesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListClusterNodesResponse(_message.Message):
    __slots__ = ("kek_id", "nodes", "join_requests")
    KEK_ID_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    JOIN_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    kek_id: str
    nodes: _containers.RepeatedCompositeFieldContainer[ClusterNode]
    join_requests: _containers.RepeatedCompositeFieldContainer[ClusterJoinRequest]
    def __init__(self, kek_id: _Optional[str] = ..., nodes: _Optional[_Iterable[_Union[ClusterNode, _Mapping]]] = ..., join_requests: _Optional[_Iterable[_Union[ClusterJoinRequest, _Mapping]]] = ...) -> None: ...

class ApproveClusterJoinRequest(_message.Message):
    __slots__ = ("fingerprint",)
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    fingerprint: str
    def __init__(self, fingerprint: _Optional[str] = ...) -> None: ...

class ApproveClusterJoinResponse(_message.Message):
    __slots__ = ("request", "kek_id")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    KEK_ID_FIELD_NUMBER: _ClassVar[int]
    request: ClusterJoinRequest
    kek_id: str
    def __init__(self, request: _Optional[_Union[ClusterJoinRequest, _Mapping]] = ..., kek_id: _Optional[str] = ...) -> None: ...

class RemoveClusterNodeRequest(_message.Message):
    __slots__ = ("name", "keep_sealing_key")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KEEP_SEALING_KEY_FIELD_NUMBER: _ClassVar[int]
    name: str
    keep_sealing_key: bool
    def __init__(self, name: _Optional[str] = ..., keep_sealing_key: _Optional[bool] = ...) -> None: ...

class RemoveClusterNodeResponse(_message.Message):
    __slots__ = ("removed", "kek_id", "delivered_to", "new_sealing_key_id")
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    KEK_ID_FIELD_NUMBER: _ClassVar[int]
    DELIVERED_TO_FIELD_NUMBER: _ClassVar[int]
    NEW_SEALING_KEY_ID_FIELD_NUMBER: _ClassVar[int]
    removed: ClusterNode
    kek_id: str
    delivered_to: _containers.RepeatedScalarFieldContainer[str]
    new_sealing_key_id: str
    def __init__(self, removed: _Optional[_Union[ClusterNode, _Mapping]] = ..., kek_id: _Optional[str] = ..., delivered_to: _Optional[_Iterable[str]] = ..., new_sealing_key_id: _Optional[str] = ...) -> None: ...

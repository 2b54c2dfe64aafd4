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
KEY_STATE_UNSPECIFIED: KeyState
KEY_STATE_ACTIVE: KeyState
KEY_STATE_DECRYPT_ONLY: KeyState
KEY_STATE_DESTROYED: KeyState

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
    __slots__ = ("backend", "library", "token", "sealing_key_id", "active_keys", "decrypt_only_keys", "destroyed_keys", "consumed_tickets", "version", "started_at", "counters", "sessions")
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
    def __init__(self, backend: _Optional[str] = ..., library: _Optional[str] = ..., token: _Optional[str] = ..., sealing_key_id: _Optional[str] = ..., active_keys: _Optional[int] = ..., decrypt_only_keys: _Optional[int] = ..., destroyed_keys: _Optional[int] = ..., consumed_tickets: _Optional[int] = ..., version: _Optional[str] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., counters: _Optional[_Mapping[str, int]] = ..., sessions: _Optional[int] = ...) -> None: ...

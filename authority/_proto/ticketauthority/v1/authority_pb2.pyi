import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RedeemResult(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REDEEM_RESULT_UNSPECIFIED: _ClassVar[RedeemResult]
    REDEEM_RESULT_OK: _ClassVar[RedeemResult]
    REDEEM_RESULT_INVALID: _ClassVar[RedeemResult]
    REDEEM_RESULT_EXPIRED: _ClassVar[RedeemResult]
    REDEEM_RESULT_REPLAYED: _ClassVar[RedeemResult]
    REDEEM_RESULT_REVOKED: _ClassVar[RedeemResult]
REDEEM_RESULT_UNSPECIFIED: RedeemResult
REDEEM_RESULT_OK: RedeemResult
REDEEM_RESULT_INVALID: RedeemResult
REDEEM_RESULT_EXPIRED: RedeemResult
REDEEM_RESULT_REPLAYED: RedeemResult
REDEEM_RESULT_REVOKED: RedeemResult

class ResumptionState(_message.Message):
    __slots__ = ("id_i", "id_r", "spi_i", "spi_r", "sk_d", "encr_id", "encr_key_bits", "prf_id", "integ_id", "dh_group", "auth_method", "gateway_data")
    ID_I_FIELD_NUMBER: _ClassVar[int]
    ID_R_FIELD_NUMBER: _ClassVar[int]
    SPI_I_FIELD_NUMBER: _ClassVar[int]
    SPI_R_FIELD_NUMBER: _ClassVar[int]
    SK_D_FIELD_NUMBER: _ClassVar[int]
    ENCR_ID_FIELD_NUMBER: _ClassVar[int]
    ENCR_KEY_BITS_FIELD_NUMBER: _ClassVar[int]
    PRF_ID_FIELD_NUMBER: _ClassVar[int]
    INTEG_ID_FIELD_NUMBER: _ClassVar[int]
    DH_GROUP_FIELD_NUMBER: _ClassVar[int]
    AUTH_METHOD_FIELD_NUMBER: _ClassVar[int]
    GATEWAY_DATA_FIELD_NUMBER: _ClassVar[int]
    id_i: bytes
    id_r: bytes
    spi_i: bytes
    spi_r: bytes
    sk_d: bytes
    encr_id: int
    encr_key_bits: int
    prf_id: int
    integ_id: int
    dh_group: int
    auth_method: int
    gateway_data: bytes
    def __init__(self, id_i: _Optional[bytes] = ..., id_r: _Optional[bytes] = ..., spi_i: _Optional[bytes] = ..., spi_r: _Optional[bytes] = ..., sk_d: _Optional[bytes] = ..., encr_id: _Optional[int] = ..., encr_key_bits: _Optional[int] = ..., prf_id: _Optional[int] = ..., integ_id: _Optional[int] = ..., dh_group: _Optional[int] = ..., auth_method: _Optional[int] = ..., gateway_data: _Optional[bytes] = ...) -> None: ...

class IssueTicketRequest(_message.Message):
    __slots__ = ("state", "lifetime_seconds", "realm")
    STATE_FIELD_NUMBER: _ClassVar[int]
    LIFETIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    REALM_FIELD_NUMBER: _ClassVar[int]
    state: ResumptionState
    lifetime_seconds: int
    realm: str
    def __init__(self, state: _Optional[_Union[ResumptionState, _Mapping]] = ..., lifetime_seconds: _Optional[int] = ..., realm: _Optional[str] = ...) -> None: ...

class IssueTicketResponse(_message.Message):
    __slots__ = ("ticket", "lifetime_seconds", "expires_at", "key_id", "ticket_lt_opaque")
    TICKET_FIELD_NUMBER: _ClassVar[int]
    LIFETIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    TICKET_LT_OPAQUE_FIELD_NUMBER: _ClassVar[int]
    ticket: bytes
    lifetime_seconds: int
    expires_at: _timestamp_pb2.Timestamp
    key_id: str
    ticket_lt_opaque: bytes
    def __init__(self, ticket: _Optional[bytes] = ..., lifetime_seconds: _Optional[int] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., key_id: _Optional[str] = ..., ticket_lt_opaque: _Optional[bytes] = ...) -> None: ...

class RedeemTicketRequest(_message.Message):
    __slots__ = ("ticket", "consume", "realm")
    TICKET_FIELD_NUMBER: _ClassVar[int]
    CONSUME_FIELD_NUMBER: _ClassVar[int]
    REALM_FIELD_NUMBER: _ClassVar[int]
    ticket: bytes
    consume: bool
    realm: str
    def __init__(self, ticket: _Optional[bytes] = ..., consume: _Optional[bool] = ..., realm: _Optional[str] = ...) -> None: ...

class RedeemTicketResponse(_message.Message):
    __slots__ = ("result", "state", "expires_at", "key_id", "ticket_id", "issued_at", "reissue", "realm", "policy_epoch")
    RESULT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    TICKET_ID_FIELD_NUMBER: _ClassVar[int]
    ISSUED_AT_FIELD_NUMBER: _ClassVar[int]
    REISSUE_FIELD_NUMBER: _ClassVar[int]
    REALM_FIELD_NUMBER: _ClassVar[int]
    POLICY_EPOCH_FIELD_NUMBER: _ClassVar[int]
    result: RedeemResult
    state: ResumptionState
    expires_at: _timestamp_pb2.Timestamp
    key_id: str
    ticket_id: bytes
    issued_at: _timestamp_pb2.Timestamp
    reissue: bool
    realm: str
    policy_epoch: int
    def __init__(self, result: _Optional[_Union[RedeemResult, str]] = ..., state: _Optional[_Union[ResumptionState, _Mapping]] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., key_id: _Optional[str] = ..., ticket_id: _Optional[bytes] = ..., issued_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., reissue: _Optional[bool] = ..., realm: _Optional[str] = ..., policy_epoch: _Optional[int] = ...) -> None: ...

class ConsumeTicketRequest(_message.Message):
    __slots__ = ("ticket_id",)
    TICKET_ID_FIELD_NUMBER: _ClassVar[int]
    ticket_id: bytes
    def __init__(self, ticket_id: _Optional[bytes] = ...) -> None: ...

class ConsumeTicketResponse(_message.Message):
    __slots__ = ("result",)
    RESULT_FIELD_NUMBER: _ClassVar[int]
    result: RedeemResult
    def __init__(self, result: _Optional[_Union[RedeemResult, str]] = ...) -> None: ...

class ItemError(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class IssueTicketsRequest(_message.Message):
    __slots__ = ("items", "batch_id")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[IssueTicketRequest]
    batch_id: int
    def __init__(self, items: _Optional[_Iterable[_Union[IssueTicketRequest, _Mapping]]] = ..., batch_id: _Optional[int] = ...) -> None: ...

class IssueTicketsResponse(_message.Message):
    __slots__ = ("items", "batch_id")
    class Item(_message.Message):
        __slots__ = ("ticket", "error")
        TICKET_FIELD_NUMBER: _ClassVar[int]
        ERROR_FIELD_NUMBER: _ClassVar[int]
        ticket: IssueTicketResponse
        error: ItemError
        def __init__(self, ticket: _Optional[_Union[IssueTicketResponse, _Mapping]] = ..., error: _Optional[_Union[ItemError, _Mapping]] = ...) -> None: ...
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[IssueTicketsResponse.Item]
    batch_id: int
    def __init__(self, items: _Optional[_Iterable[_Union[IssueTicketsResponse.Item, _Mapping]]] = ..., batch_id: _Optional[int] = ...) -> None: ...

class RedeemTicketsRequest(_message.Message):
    __slots__ = ("items", "batch_id")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[RedeemTicketRequest]
    batch_id: int
    def __init__(self, items: _Optional[_Iterable[_Union[RedeemTicketRequest, _Mapping]]] = ..., batch_id: _Optional[int] = ...) -> None: ...

class RedeemTicketsResponse(_message.Message):
    __slots__ = ("items", "batch_id")
    class Item(_message.Message):
        __slots__ = ("redeemed", "error")
        REDEEMED_FIELD_NUMBER: _ClassVar[int]
        ERROR_FIELD_NUMBER: _ClassVar[int]
        redeemed: RedeemTicketResponse
        error: ItemError
        def __init__(self, redeemed: _Optional[_Union[RedeemTicketResponse, _Mapping]] = ..., error: _Optional[_Union[ItemError, _Mapping]] = ...) -> None: ...
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[RedeemTicketsResponse.Item]
    batch_id: int
    def __init__(self, items: _Optional[_Iterable[_Union[RedeemTicketsResponse.Item, _Mapping]]] = ..., batch_id: _Optional[int] = ...) -> None: ...

class ConsumeTicketsRequest(_message.Message):
    __slots__ = ("items", "batch_id")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ConsumeTicketRequest]
    batch_id: int
    def __init__(self, items: _Optional[_Iterable[_Union[ConsumeTicketRequest, _Mapping]]] = ..., batch_id: _Optional[int] = ...) -> None: ...

class ConsumeTicketsResponse(_message.Message):
    __slots__ = ("items", "batch_id")
    class Item(_message.Message):
        __slots__ = ("consumed", "error")
        CONSUMED_FIELD_NUMBER: _ClassVar[int]
        ERROR_FIELD_NUMBER: _ClassVar[int]
        consumed: ConsumeTicketResponse
        error: ItemError
        def __init__(self, consumed: _Optional[_Union[ConsumeTicketResponse, _Mapping]] = ..., error: _Optional[_Union[ItemError, _Mapping]] = ...) -> None: ...
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ConsumeTicketsResponse.Item]
    batch_id: int
    def __init__(self, items: _Optional[_Iterable[_Union[ConsumeTicketsResponse.Item, _Mapping]]] = ..., batch_id: _Optional[int] = ...) -> None: ...

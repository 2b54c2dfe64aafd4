"""The error hierarchy: every error the authority raises on purpose, each knowing its gRPC status.

The domain never imports grpc, so the status is named by its ``grpc.StatusCode`` member name; the
service layer's guards turn it into the status (``failure`` in authority/service/interceptors.py).
"""

from __future__ import annotations


class AuthorityError(Exception):
    """Base of all deliberate errors. ``status`` names a ``grpc.StatusCode`` member."""

    status = "UNKNOWN"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(AuthorityError):
    """A request field is malformed; the message starts with the field's name."""

    status = "INVALID_ARGUMENT"

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


class NotFound(AuthorityError):
    """The request names something that does not exist (for example an unknown key id)."""

    status = "NOT_FOUND"


class PermissionDenied(AuthorityError):
    """The caller is known but may not do this (for example a realm its certificate is not
    allowed)."""

    status = "PERMISSION_DENIED"


class FailedPrecondition(AuthorityError):
    """The request is well formed but the system is not in a state that allows it."""

    status = "FAILED_PRECONDITION"


class DeviceUnavailable(AuthorityError):
    """The HSM or TPM failed, is unreachable, or no device session could be had in time."""

    status = "UNAVAILABLE"


class ResourceExhausted(AuthorityError):
    """A limit was reached (a budget, a queue, a rate)."""

    status = "RESOURCE_EXHAUSTED"


class InvalidTicket(Exception):
    """A ticket failed a check before integrity was established.

    Callers turn it into the redeem result INVALID and tell the client nothing more; ``cause`` is
    for the server's debug log and counters only.
    """

    def __init__(self, cause: str) -> None:
        super().__init__(cause)
        self.cause = cause


class UnsealFailed(InvalidTicket):
    """The device refused to open a sealed blob: wrong key, tampered bytes or a bad tag.

    One exception for every authentication failure, as cryptography's ``InvalidTag``.
    """

    def __init__(self) -> None:
        super().__init__("authentication failed")


class KeyNotFound(InvalidTicket):
    """The device holds no key with the requested id."""

    def __init__(self, key_id: bytes) -> None:
        super().__init__(f"key {key_id.hex()} not in the device")
        self.key_id = key_id


class ConfigError(Exception):
    """A setting is wrong; raised at start-up. The message starts with the setting's name."""

    def __init__(self, setting: str, problem: str) -> None:
        super().__init__(f"{setting}: {problem}")
        self.setting = setting


class StartupError(Exception):
    """The service cannot start (device missing, login refused, state unreadable)."""


class KeyProtectionError(StartupError, FailedPrecondition):
    """The key device cannot make a ticket key with the protection the service requires: it
    refused a required attribute of the key template, or reports a key it made as extractable,
    not sensitive, modifiable or otherwise not as asked. The message starts with the setting.

    A StartupError: at start-up the service does not start. A FailedPrecondition
    (FAILED_PRECONDITION) when a rotation meets it while serving: retrying does not help until
    the device or its configuration changes; the key ring is left as it was.
    """

"""Errors of the ``authority.ikev2`` package. Both are ``ValueError`` subclasses, so callers that
only know "bad input" can catch ``ValueError``."""

from __future__ import annotations


class UnknownTransformError(ValueError):
    """A transform id (PRF, encryption or integrity algorithm) that this package does not know."""

    def __init__(self, kind: str, transform_id: int) -> None:
        super().__init__(f"unknown {kind} transform id {transform_id}")
        self.kind = kind
        self.transform_id = transform_id


class PayloadError(ValueError):
    """Octets that are not a well-formed IKEv2 header, payload or message; the message names the
    field or rule that is violated."""

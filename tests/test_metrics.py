"""Prometheus metrics over HTTP: counts by result, RPC and device latency, keys, consumed set."""

from __future__ import annotations

import urllib.request
from collections.abc import Callable
from dataclasses import replace

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from authority._proto.ticketauthority.v1 import authority_pb2
from tests.conftest import Harness, issue, redeem


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_count_what_happens(make_harness: Callable[..., Harness]) -> None:
    h = make_harness()
    h.config = replace(h.config, server=replace(h.config.server, metrics_listen="127.0.0.1:0"))
    running = h.start()
    assert running.metrics_port
    stub = h.tickets
    ticket = issue(stub).ticket
    redeem(stub, ticket, consume=True)
    redeem(stub, ticket)
    redeem(stub, b"\x01" * 150)
    with pytest.raises(grpc.RpcError):
        stub.IssueTicket(authority_pb2.IssueTicketRequest())
    m = scrape(running.metrics_port)
    assert m[("ticket_authority_tickets_issued_total", ())] == 1
    assert m[("ticket_authority_redeems_total", (("result", "ok"),))] == 1
    assert m[("ticket_authority_redeems_total", (("result", "replayed"),))] == 1
    assert m[("ticket_authority_redeems_total", (("result", "invalid"),))] == 1
    assert m[("ticket_authority_redeems_invalid_total", (("stage", "malformed"),))] == 1
    assert m[("ticket_authority_consumed_tickets", ())] == 1
    assert m[("ticket_authority_rpc_seconds_count",
              (("code", "OK"), ("method", "RedeemTicket")))] == 3
    assert m[("ticket_authority_rpc_seconds_count",
              (("code", "INVALID_ARGUMENT"), ("method", "IssueTicket")))] == 1
    assert m[("ticket_authority_device_operation_seconds_count", (("op", "unseal_many"),))] == 2
    assert m[("ticket_authority_device_operation_seconds_count", (("op", "seal_many"),))] == 1
    assert m[("ticket_authority_device_sessions_in_use", ())] == 0
    primary = h.authority.ring.primary_id.hex()
    assert m[("ticket_authority_key_seals", (("key_id", primary), ("state", "ACTIVE")))] == 1
    assert ("ticket_authority_key_age_seconds",
            (("key_id", primary), ("state", "ACTIVE"))) in m

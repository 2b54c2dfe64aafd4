"""The committed gRPC stubs are exactly what the .proto files generate."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_committed_stubs_match_the_protos(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "tools" / "gen_proto.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["gen_proto"] = module
    spec.loader.exec_module(module)
    module.generate(tmp_path)
    committed = ROOT / "authority" / "_proto"
    fresh = {p.relative_to(tmp_path): p.read_text() for p in tmp_path.rglob("*.py*")}
    old = {p.relative_to(committed): p.read_text() for p in committed.rglob("*.py*")
           if "__pycache__" not in p.parts}
    assert fresh.keys() == old.keys()
    stale = [str(name) for name in fresh if fresh[name] != old[name]]
    assert not stale, f"regenerate with: python tools/gen_proto.py ({stale})"


def test_contract_names_are_kept() -> None:
    from authority._proto.ticketauthority.v1 import admin_pb2, authority_pb2

    ticket = authority_pb2.DESCRIPTOR.services_by_name["TicketAuthority"]
    assert {m.name for m in ticket.methods} >= {"IssueTicket", "RedeemTicket", "ConsumeTicket"}
    admin = admin_pb2.DESCRIPTOR.services_by_name["TicketAdmin"]
    assert {m.name for m in admin.methods} >= {"RotateKey", "ListKeys", "RetireKey", "GetStatus"}
    assert authority_pb2.DESCRIPTOR.package == "ticketauthority.v1"
    result = authority_pb2.RedeemResult
    assert [(result.Name(v), v) for v in range(6)] == [
        ("REDEEM_RESULT_UNSPECIFIED", 0), ("REDEEM_RESULT_OK", 1), ("REDEEM_RESULT_INVALID", 2),
        ("REDEEM_RESULT_EXPIRED", 3), ("REDEEM_RESULT_REPLAYED", 4), ("REDEEM_RESULT_REVOKED", 5)]
    request = authority_pb2.IssueTicketRequest.DESCRIPTOR.fields_by_name
    assert request["state"].number == 1 and request["lifetime_seconds"].number == 2
    redeem = authority_pb2.RedeemTicketRequest.DESCRIPTOR.fields_by_name
    assert redeem["ticket"].number == 1 and redeem["consume"].number == 2
    assert authority_pb2.ConsumeTicketRequest.DESCRIPTOR.fields_by_name["ticket_id"].number == 1
    state = set(authority_pb2.ResumptionState.DESCRIPTOR.fields_by_name)
    assert state == {"id_i", "id_r", "spi_i", "spi_r", "sk_d", "encr_id", "encr_key_bits",
                     "prf_id", "integ_id", "dh_group", "auth_method", "gateway_data"}


def test_every_package_is_packaged() -> None:
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
                 ["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "authority").rglob(
        "__init__.py") if "__pycache__" not in p.parts}
    assert found <= listed, f"add to pyproject.toml [tool.setuptools] packages: {found - listed}"

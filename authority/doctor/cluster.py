"""The checks that compare what the store records with this host: the clock against the
store's, the replicas' heartbeats and the maintenance lease, the state's recorded backend and
device, and the key ring against the device (a PKCS#11 token, or the TPM backend's key dir)."""

from __future__ import annotations

from pathlib import Path
from typing import Final

from authority.clock import MAX_SLEW, STEP
from authority.config import Config
from authority.doctor.device import DeviceResult
from authority.doctor.report import Check, failure, ok, skip, warning
from authority.doctor.store import StoreFacts

#: the service clock's rules (authority/clock.py SteadyClock), said with every clock check
CLOCK_RULES = (f"the service clock does not follow a system clock step over {STEP:.0f} s: it "
               f"moves towards it at {MAX_SLEW * 100:.2f} % ({MAX_SLEW * 86400:.0f} s per day)")
_NTP_HINT = ("synchronise this host's clock (chrony, systemd-timesyncd) with the same source "
             "as the database server's: replicas judge leases and heartbeats by their clocks")


def check_clock(config: Config, facts: StoreFacts) -> Check:
    """This host's clock against PostgreSQL's (when configured): within ``STEP`` OK, within
    half a lease a warning, beyond a failure (a lease would expire early or late)."""
    if facts.store_now is None or facts.local_at is None:
        where = ("no store clock to compare with (SQLite)" if config.postgresql is None
                 else "the store's clock could not be read")
        return ok("clock", f"{where}; {CLOCK_RULES}")
    skew = facts.local_at - facts.store_now
    detail = f"this host's clock is {skew:+.3f} s from the database server's; {CLOCK_RULES}"
    if abs(skew) <= STEP:
        return ok("clock", detail)
    if abs(skew) <= config.cluster.lease_duration / 2:
        return warning("clock", detail, _NTP_HINT)
    return failure("clock", detail + f" (over half of cluster.lease_duration, "
                                     f"{config.cluster.lease_duration:g} s)", _NTP_HINT)


def check_replicas(config: Config, facts: StoreFacts, now: float) -> Check:
    """Live replicas (a heartbeat within cluster.replica_timeout) and the maintenance lease
    held by one of them."""
    if facts.replicas is None:
        return skip("replicas", "the store could not be read")
    if not facts.replicas:
        return ok("replicas", "no replica has started on this store yet")
    timeout = config.cluster.replica_timeout
    live = [r for r in facts.replicas if now - r.heartbeat_at <= timeout]
    if not live:
        last = max(facts.replicas, key=lambda r: r.heartbeat_at)
        return warning("replicas", f"no live replica: {len(facts.replicas)} recorded, the "
                                   f"last heartbeat {now - last.heartbeat_at:.0f} s ago "
                                   f"({last.host} pid {last.pid})",
                       "start serve (records of stopped replicas are dropped after 24 h)")
    shown = ", ".join(f"{r.host} pid {r.pid}" for r in live)
    lease = facts.lease
    holder = next((r for r in live if lease is not None and r.replica_id == lease.holder), None)
    if lease is None or holder is None or lease.expires_at + config.cluster.lease_duration < now:
        return warning("replicas", f"{len(live)} live ({shown}) but no live replica holds the "
                                   "maintenance lease: scheduled rotation and purges wait",
                       "look at the replicas' logs for store errors; the lease is taken at the "
                       "next heartbeat of a healthy replica")
    return ok("replicas", f"{len(live)} live ({shown}); maintenance lease held by "
                          f"{holder.host} pid {holder.pid}, epoch {lease.epoch}")


#: what to call each backend's state directory and device in the checks
_KIND: Final = {"pkcs11": "PKCS#11", "tpm": "TPM"}
_DEVICE: Final = {"pkcs11": "the token", "tpm": "the TPM backend's key dir"}


def check_backend(config: Config, facts: StoreFacts, config_file: Path | None) -> Check | None:
    """device.backend, when the store records another backend than ``config``'s: serve
    refuses to start on that state (authority/statedir.py check_backend), so the device
    checks of ``config``'s backend would only mislead ("embedded SoftHSM2 token not
    provisioned" for a TPM state dir). None when the backends agree or none is recorded."""
    owner = facts.owner
    if owner is None or owner[0] == config.backend:
        return None
    kind = _KIND.get(owner[0], owner[0])
    given = ("the default or --backend, without --config" if config_file is None
             else f"by {config_file}")
    return failure(
        "device.backend",
        f"{config.state_dir} is a {kind} state dir: its store records backend {owner[0]} "
        f"({owner[1]}); serve refuses to start on it with backend {config.backend}, the one "
        f"doctor was given ({given})",
        f"run doctor as serve runs: --backend {owner[0]} (what 'serve --backend {owner[0]}' "
        f"uses), or --config FILE with backend = \"{owner[0]}\""
        + (" and [tpm] as serve has it" if owner[0] == "tpm" else ""))


def check_ownership(config: Config, facts: StoreFacts, device: DeviceResult) -> Check:
    """The device the state records (authority/statedir.py) is this one, and it holds every
    live key of the key ring (for the TPM: their blobs are in the key dir, and the backend
    does not refuse them)."""
    name, tpm = "device.ring", config.backend == "tpm"
    where = _DEVICE.get(config.backend, "the device")
    if facts.ring is None or device.keys is None:
        return skip(name, f"needs both the store and {where}")
    owner = facts.owner
    if (owner is not None and not config.cluster.per_node_tokens
            and device.identity is not None and owner != (config.backend, device.identity)):
        return failure(name, f"the state belongs to {owner[0]} {owner[1]}, not "
                             f"{config.backend} {device.identity}",
                       ("point [tpm] (tcti, key_dir) at the TPM and key dir" if tpm else
                        "point [pkcs11] at the token") + " the state was made with, or use "
                                                         "another state_dir / database")
    missing = facts.ring - device.keys
    if missing and not config.cluster.per_node_tokens:
        ids = ", ".join(sorted(k.hex() for k in missing))
        if tpm:
            return failure(name, f"the TPM backend cannot use {len(missing)} live key(s) of "
                                 f"the key ring: {ids} (their blobs are not in the key dir, "
                                 "or the backend refuses them: device.key_attributes)",
                           "restore the key dir from its backup, with the TPM (state) it "
                           "belongs to (docs/operations.md); serve marks such a key MISSING "
                           "(its tickets are INVALID) and replaces a sealing key by itself; "
                           "retire one that is lost ('keys retire')")
        return failure(name, f"the token lacks {len(missing)} live key(s) of the key "
                             f"ring: {ids}",
                       "restore the token from its backup (docs/operations.md); tickets "
                       "sealed under a lost key cannot be opened: retire it ('keys retire')")
    return ok(name, f"{where} holds the key ring's {len(facts.ring)} live key(s)")

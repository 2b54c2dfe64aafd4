"""The device checks of the TPM backend (``backend = "tpm"``): the TPM answers through the
configured TCTI, it offers what the ticket backend needs, the parent of the ticket keys is
there, and every ticket key in the key directory loads under it with exactly the attributes
and algorithms of the backend's templates (templates.key_problems, the comparison serve makes:
a key that differs is refused by serve, so doctor does not load it either).

Each step is the backend's own code (authority/backends/tpm: connection, probe, capabilities,
parent, keycache, templates, blobs), run read-only:

* the embedded swtpm is never started (serve starts it, and it runs while serve does), the
  key directory is neither created nor tidied;
* nothing is made in the TPM but what serve itself remakes at every start (the storage
  primary, from its fixed template) and the two objects of each key while it is checked, all
  transient and flushed before doctor returns; no object of another client is flushed. The
  only state change doctor may cause is the one any TSS client causes: TPM2_Startup(CLEAR)
  sent to a TPM that nobody has started yet (``Connection.connect``);
* beside a running serve on a TPM without a resource manager (the embedded swtpm, a
  ``swtpm:`` or ``mssim:`` TCTI, ``device:/dev/tpm0``), the TPM's few transient slots are
  serve's (3 on swtpm; serve keeps a key loaded in two of them): an object doctor loaded
  would make serve's next key load fail. Doctor then loads nothing: it checks what takes no
  slot (the TPM answers, its capabilities, a persistent parent) and each key's public areas
  from its blobs, and says what it left out and why.

The owner authorisation (``tpm.owner_auth_file`` / ``owner_auth_env``) is a ``Secret`` handed
to the TSS only: it is never in a check, a log line or a repr.
"""

from __future__ import annotations

import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, cast

from tpm2_pytss.types import TPM2B_PUBLIC  # type: ignore[import-untyped, unused-ignore]

from authority.backends.base import KeyBackend
from authority.backends.tpm._errors import Phase
from authority.backends.tpm.blobs import BlobStore
from authority.backends.tpm.capabilities import REQUIRED_COMMANDS, check_capabilities
from authority.backends.tpm.connection import Connection
from authority.backends.tpm.keycache import KeyCache
from authority.backends.tpm.parent import Parent
from authority.backends.tpm.probe import (
    PT_FIXED,
    PT_VAR,
    DeviceInfo,
    describe,
    read_capabilities,
    read_properties,
)
from authority.backends.tpm.swtpm import SOCKET_FILE
from authority.backends.tpm.templates import KEY_TEMPLATES, key_problems, read_attributes
from authority.config import Config, Secret
from authority.doctor.device import DeviceResult
from authority.doctor.files import lock_holder
from authority.doctor.report import Check, Status, failure, ok
from authority.errors import AuthorityError, InvalidTicket, StartupError
from authority.statedir import device_identity

__all__ = ["check_tpm"]

#: TCTIs that reach the TPM through a resource manager: each client has its own slots
_RESOURCE_MANAGED: Final = ("device:/dev/tpmrm", "tabrmd", "libtss2-tcti-tabrmd")
_SWTPM_STATE: Final = "tpm2-00.permall"   # what swtpm writes at its first start
_AS_SERVE = "run doctor as the user serve runs as"
_KEY_HINT = ("a key the authority did not make (its blobs swapped or restored from elsewhere), "
             "or made under another template: serve never uses it (its tickets are INVALID; "
             "the key ring marks it MISSING, or replaces it if it seals); if 'ticket-authority "
             "keys list' shows it, retire it ('keys retire ID'), otherwise remove its four "
             "files from the key dir")
_LOAD_HINT = ("a blob made by another TPM, or before this TPM's owner hierarchy was cleared, "
              "never loads again: restore the key dir and the TPM (state) that belong "
              "together (docs/operations.md), or retire the key ('keys retire ID') and rotate")


@dataclass
class _Run:
    """One doctor run against the TPM: its settings, what it found so far."""

    config: Config
    checks: list[Check] = field(default_factory=list)
    serve_pid: int | None = None       # a running serve holding the state directory's lock
    tcti: str = ""
    info: DeviceInfo | None = None
    parent: Parent | None = None       # prepared: the keys may be loaded under it


def check_tpm(config: Config) -> DeviceResult:
    """The TPM's device checks for ``config``: device.tpm, device.capabilities, device.parent,
    device.keys, device.key_attributes. Never raises for what it finds: each problem is a
    failed (or, where doctor cannot look, a skipped) check with its fix."""
    run = _Run(config, serve_pid=lock_holder(config.state_dir))
    # the TPM branch of device_identity reads the configuration only
    result = DeviceResult(identity=device_identity(config, cast(KeyBackend, None)))
    blobs = _ReadOnlyBlobs(_key_dir(config))
    keys, unreadable = _list_keys(blobs)
    conn: Connection | None = None
    tcti = _tcti(run)
    if tcti is not None:
        run.tcti = tcti
        conn = Connection(tcti, config.tpm.owner_auth, config.tpm.retries)
    try:
        if conn is not None:
            _reach(run, conn)
        if keys is None:
            run.checks.append(failure("device.keys", unreadable, _AS_SERVE))
        else:
            refused = {k for k in keys if _key_problems(blobs, k, None, unreadable=False)}
            loaded = _check_loads(run, conn, blobs, keys, refused)
            run.checks.append(_check_attributes(keys, blobs, loaded))
            keys = keys - refused     # what serve's list_keys gives: refused keys left out
    finally:
        if conn is not None:
            conn.close()
    result.checks, result.keys = run.checks, keys
    return result


# -- where the TPM is --------------------------------------------------------------------------


def _key_dir(config: Config) -> Path:
    """The key blobs' directory, as ``open_tpm_backend`` chooses it."""
    tpm = config.tpm
    return (tpm.key_dir if tpm.key_dir is not None else config.state_dir / "tpm" / "keys")


def _tcti(run: _Run) -> str | None:
    """The configured TCTI, or the embedded swtpm's when it runs (None, with a check saying
    why, when it does not: doctor does not start it)."""
    if run.config.tpm.tcti is not None:
        return run.config.tpm.tcti
    swtpm_dir = (run.config.state_dir / "tpm" / "swtpm").absolute()
    data = swtpm_dir / SOCKET_FILE
    problem = _embedded_problem(swtpm_dir, data)
    if problem is not None:
        run.checks.append(problem)
        return None
    return f"swtpm:path={data}"


def _embedded_problem(swtpm_dir: Path, data: Path) -> Check | None:
    """None when the embedded swtpm answers on ``data``; else the device.tpm check saying
    why not: never started (a failure), not running now (skipped: it runs while serve does)."""
    if shutil.which("swtpm") is None:
        return failure("device.tpm", "tpm.tcti is not set and swtpm, which serve starts as the "
                                     "embedded TPM, is not installed",
                       "apt-get install swtpm swtpm-tools, or set tpm.tcti to a TPM "
                       "(e.g. 'device:/dev/tpmrm0')")
    if not (swtpm_dir / _SWTPM_STATE).is_file():
        return failure("device.tpm", f"the embedded swtpm has never run: no TPM state in "
                                     f"{swtpm_dir}",
                       "start 'ticket-authority serve' once with this state_dir: it starts "
                       "the embedded swtpm and makes the first key (doctor only reads, it "
                       "never starts one); or set tpm.tcti to a TPM")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(2.0)
            probe.connect(str(data))
    except (FileNotFoundError, ConnectionRefusedError):
        return Check("device.tpm", Status.SKIP,
                     f"the embedded swtpm ({swtpm_dir}) is not running: serve starts it and "
                     "stops it with itself, and doctor does not start it, so only the key "
                     "blobs were read (device.key_attributes)",
                     "run doctor while serve runs to check the TPM itself")
    except OSError as exc:
        return failure("device.tpm", f"cannot reach the embedded swtpm at {data}: "
                                     f"{exc.strerror or exc}", _AS_SERVE)
    return None


# -- the TPM itself ----------------------------------------------------------------------------


def _reach(run: _Run, conn: Connection) -> None:
    """device.tpm, device.capabilities and device.parent, each as serve's start-up does
    it (Device.start), minus flushing other clients' objects."""
    where = (f"the embedded swtpm ({run.tcti})" if run.config.tpm.tcti is None
             else f"the TPM at '{run.tcti}'")
    try:
        conn.connect(Phase.CONNECT)
        fixed = read_properties(conn, PT_FIXED, Phase.CONNECT)
        variable = read_properties(conn, PT_VAR, Phase.STARTUP)
    except (StartupError, AuthorityError) as exc:
        run.checks.append(failure("device.tpm", str(exc), _reach_hint(run)))
        return
    run.info = describe(run.tcti, fixed, variable, 0, 0)   # no key cache, nothing flushed
    run.checks.append(ok("device.tpm", f"{where} answers: {run.info.token}; dictionary-attack "
                                       f"lockout counter {run.info.lockout_counter}"))
    run.checks.append(_check_capabilities(run.tcti, run.info, conn))
    run.checks.append(_check_parent(run, conn))


def _reach_hint(run: _Run) -> str:
    """How to make the TPM at ``run.tcti`` reachable."""
    hint = ("check tpm.tcti and that the TPM behind it runs and this user may use it "
            "(device:/dev/tpmrm0: the tss group); serve fails to start the same way")
    if run.serve_pid is not None and run.tcti.startswith("device") and \
            not _resource_managed(run.tcti):
        hint += (f"; serve (pid {run.serve_pid}) runs: a TPM device without a resource "
                 "manager (/dev/tpm0) takes one user at a time, use /dev/tpmrm0")
    return hint


def _check_capabilities(tcti: str, info: DeviceInfo, conn: Connection) -> Check:
    """What the backend requires of the TPM (capabilities.py), read as start-up reads it."""
    try:
        check_capabilities(read_capabilities(conn, info.transient_slots), tcti)
    except (StartupError, AuthorityError) as exc:
        return failure("device.capabilities", str(exc),
                       "use a TPM that implements them, or the PKCS#11 backend")
    return ok("device.capabilities",
              f"all the ticket backend needs: {', '.join(REQUIRED_COMMANDS.values())}; "
              f"AES-256-CFB and HMAC-SHA256 objects (TPM2_TestParms), ECC NIST P-256; "
              f"{info.transient_slots} transient slots, {info.max_buffer} octets per command")


def _check_parent(run: _Run, conn: Connection) -> Check:
    """The parent of the ticket keys, prepared as serve prepares it (Parent.prepare): the
    persistent storage key read back, or the storage primary made from its template (which
    needs a transient slot: not beside a running serve on an unmanaged TPM)."""
    persistent = run.config.tpm.parent
    if persistent is None and (why := _slots_taken(run)) is not None:
        return Check("device.parent", Status.SKIP, "the storage primary was not made: "
                     + why.detail, why.hint)
    parent = Parent(conn, persistent)
    try:
        parent.prepare()
    except (StartupError, AuthorityError) as exc:
        hint = ("put the owner hierarchy's authorisation in tpm.owner_auth_file (or "
                "owner_auth_env); with an empty one, leave both unset" if "owner_auth" in
                str(exc) else "check tpm.parent: a persistent storage key (restricted "
                              "decrypt) under which the ticket keys were made")
        return failure("device.parent", str(exc), hint)
    run.parent = parent
    if persistent is not None:
        return ok("device.parent", f"persistent storage key 0x{persistent:08x}: restricted, "
                                   "decrypt")
    return ok("device.parent", "storage primary made from the backend's template (ECC NIST "
                               "P-256, owner hierarchy): the owner authorisation is accepted")


def _slots_taken(run: _Run) -> Check | None:
    """Why doctor must not load objects into this TPM now, as a device.keys check (skipped):
    a running serve uses an unmanaged TPM's transient slots. None if it may."""
    if run.serve_pid is None or _resource_managed(run.tcti):
        return None
    slots = f"its {run.info.transient_slots} " if run.info is not None else "its "
    hint = ("serve loads each key itself when it uses it: a key that does not load fails its "
            "calls (the server log, ticket_authority_device_errors_total)")
    if run.config.tpm.tcti is not None:
        hint += ("; for this check run doctor while serve is stopped, or reach the TPM "
                 "through a resource manager (device:/dev/tpmrm0, tabrmd)")
    return Check(
        "device.keys", Status.SKIP,
        f"not loaded: serve (pid {run.serve_pid}) uses this TPM, which has no resource "
        f"manager, and {slots}transient slots are serve's (an object doctor loaded would "
        "fail serve's next key load); the keys' public areas were read from their blobs",
        hint)


def _resource_managed(tcti: str) -> bool:
    return tcti.startswith(_RESOURCE_MANAGED)


# -- the keys ----------------------------------------------------------------------------------


class _ReadOnlyBlobs(BlobStore):
    """The key directory read by the backend's own listing and reading (blobs.py), without
    the start-up work of its constructor (creating the directory, fixing its mode, removing
    temporary files): doctor only reads."""

    def __init__(self, directory: Path) -> None:   # no super().__init__: it writes
        self.directory = directory.absolute()


def _list_keys(blobs: BlobStore) -> tuple[set[bytes] | None, str]:
    """The ids ``list_keys`` would return (an absent key dir: none yet), or None and why."""
    if not blobs.directory.exists():
        return set(), ""
    try:
        return blobs.list(), ""
    except AuthorityError as exc:
        return None, str(exc)


def _check_loads(run: _Run, conn: Connection | None, blobs: BlobStore, keys: set[bytes],
                 refused: set[bytes]) -> dict[bytes, dict[str, bool]]:
    """device.keys: each key loaded under the parent as serve loads it (KeyCache), its
    attributes read back (TPM2_ReadPublic), then flushed; not the ``refused`` ones (not the
    templates' keys: serve refuses them before loading). Returns the attributes read back."""
    shown = ", ".join(k.hex() for k in sorted(keys))
    if not keys:
        run.checks.append(ok("device.keys", f"no ticket key in {blobs.directory} yet (serve "
                                            "makes the first at its start)"))
        return {}
    why = _slots_taken(run)
    if conn is None or run.parent is None or run.info is None or why is not None:
        run.checks.append(why or Check("device.keys", Status.SKIP,
                                       f"{len(keys)} key(s) ({shown}) not loaded: no TPM to "
                                       "load them in (device.tpm, device.parent)"))
        return {}
    loaded, failed = _load_each(conn, run.parent, run.info, blobs, keys - refused)
    unused = (f"; not loaded: {', '.join(k.hex() for k in sorted(refused))} (serve refuses "
              "them before loading: device.key_attributes)") if refused else ""
    if failed:
        run.checks.append(failure(
            "device.keys", f"{len(failed)} of {len(keys)} ticket keys do not load under "
                           f"the parent: " + "; ".join(f"{k.hex()} ({reason})"
                                                       for k, reason in sorted(failed.items()))
                           + unused, _LOAD_HINT))
    else:
        usable = ", ".join(k.hex() for k in sorted(keys - refused)) or "none"
        run.checks.append(ok("device.keys", f"{len(keys - refused)} ticket key(s) load under "
                                            f"the parent: {usable}{unused}"))
    return loaded


def _load_each(conn: Connection, parent: Parent, info: DeviceInfo, blobs: BlobStore,
               keys: set[bytes]) -> tuple[dict[bytes, dict[str, bool]], dict[bytes, str]]:
    """Load, read back and flush each key; (attributes of those that loaded, why the others
    did not)."""
    cache = KeyCache(conn, parent, blobs)
    cache.slots = info.transient_slots
    loaded: dict[bytes, dict[str, bool]] = {}
    failed: dict[bytes, str] = {}
    for key_id in sorted(keys):
        try:
            pair = cache.pair(key_id)
            loaded[key_id] = read_attributes(conn, pair.aes, pair.hmac)
        except (AuthorityError, InvalidTicket) as exc:
            failed[key_id] = str(exc)
        finally:
            cache.forget(key_id)
    return loaded, failed


def _check_attributes(keys: set[bytes], blobs: BlobStore,
                      loaded: dict[bytes, dict[str, bool]]) -> Check:
    """device.key_attributes: each key's TPMA_OBJECT bits (as the TPM reports them when it
    was loaded, else from its public blobs) and algorithms against the templates."""
    if not keys:
        return ok("device.key_attributes", "no ticket key to check yet")
    wrong = [f"{key_id.hex()} ({', '.join(problems)})" for key_id in sorted(keys)
             if (problems := _key_problems(blobs, key_id, loaded.get(key_id)))]
    if wrong:
        return failure("device.key_attributes",
                       f"{len(wrong)} of {len(keys)} ticket keys differ from the backend's "
                       "templates, and serve refuses them: " + "; ".join(wrong), _KEY_HINT)
    source = ("read back from the TPM" if len(loaded) == len(keys)
              else "read from their blobs" if not loaded
              else "read back from the TPM, or from the blobs of those not loaded")
    return ok("device.key_attributes",
              f"{len(keys)} ticket key(s) ({', '.join(k.hex() for k in sorted(keys))}), "
              f"{source}: fixedTPM, fixedParent (not duplicable), sensitiveDataOrigin, noDA, "
              "userWithAuth, not restricted; AES-256-CFB and HMAC-SHA256 as the templates")


def _key_problems(blobs: BlobStore, key_id: bytes, reported: dict[str, bool] | None,
                  unreadable: bool = True) -> list[str]:
    """What is wrong with one key (templates.key_problems: each attribute that differs, as
    ``reported`` by the TPM or else in its public blobs, each algorithm field that differs),
    or, if ``unreadable``, that its public blobs cannot be read."""
    conn = Connection("", Secret(""), 0)   # parses blobs only: the one error translation
    try:
        raw = blobs.read(key_id)
        publics = {prefix: conn.call(f"parsing the blobs of key {key_id.hex()}",
                                     TPM2B_PUBLIC.unmarshal, raw[f"{prefix}.pub"])[0]
                   for prefix, _template in KEY_TEMPLATES}
    except (AuthorityError, InvalidTicket) as exc:
        return [f"its public blobs cannot be read: {exc}"] if unreadable else []
    return key_problems(publics, reported)

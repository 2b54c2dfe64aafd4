"""The key ring: which key seals, which keys open, and the rules that move keys through their life.

Modelled on Vault transit's key policy: a single sealing (ACTIVE) key; DECRYPT_ONLY keys open
tickets until their window closes; unknown, destroyed, missing or out-of-window ids are refused
before any device call. Metadata lives in the store; the keys themselves only in the device.

Replicas (authority/cluster.py) share the ring through the store; one process alone is a
cluster of one and runs the same code:

- The ring has a version in the store. Every change of it (rotation, publication, retirement,
  destruction, MISSING/found) is computed from this replica's copy and committed with a
  compare-and-swap on the version (``Store.commit_ring``), in one transaction with the record
  changes; a replica whose copy was stale re-reads the ring and decides again (``_apply``). Two
  rotations at once: one commits, the other finds the ring moved, destroys the key it created
  and adopts the winner's (one new key, never two sealing keys).
- A new key is first PENDING: every replica opens tickets under it, none seals with it; the
  previous ACTIVE key keeps sealing. Each replica reports in its heartbeat the keys its own
  device holds (``loaded``, checked by listing the device: a key may one day reach a replica's
  token by another route); the key becomes ACTIVE once every live replica has reported it, or
  ``keys.publish_delay`` after its creation. With no other live replica it is ACTIVE at once.
- Seals are reserved in blocks from the store (``Store.reserve_seals``, atomic across replicas),
  so a key's nonce budget counts every replica's seals. A replica seals only while its copy of
  the ring was confirmed current within ``cluster.replica_timeout`` (its heartbeat confirms it);
  so when a key stops sealing, a replica that has not noticed yet stops within that bound, and
  the key's decryption window is that much longer when other replicas are live.
- A redeem under a key id the ring does not know re-reads the ring once (at most one re-read
  per ``UNKNOWN_KEY_REREAD_GAP`` seconds, so garbage tickets cannot hammer the store).

The ring is reconciled with the keys the device lists at start, at each maintenance pass and
when the device cannot find the sealing key (``_reconcile``): a key the device does not list is
MISSING, never marked destroyed for that (a lost key directory, a removed token object: it may
come back); a sealing key it does not list is replaced by a new one, ACTIVE at once. A key is
recorded CREATING before it is created in the device, so a crash or a timed-out create leaves a
record; the maintenance lease holder gives it up once ``CREATING_GRACE`` has passed (the record
first marked DESTROYED with a compare-and-swap, then the key destroyed, then the record
dropped). Device keys the ring never recorded are left alone (the token may be shared).
CREATING records are bookkeeping outside the ring's version: recording one does not move it.

The package's modules, one layer of ``KeyRing`` each: core.py (the copy of the ring, reading and
the compare-and-swap commit), publish.py (heartbeats, PENDING publication), lifecycle.py
(rotation, retirement, destruction), reconcile.py (maintenance, MISSING/found, CREATING
sweeps), ring.py (``KeyRing``: start-up, hot paths, views).
"""

from authority.keyring.core import CAS_ATTEMPTS, CREATING_GRACE
from authority.keyring.ring import UNKNOWN_KEY_REREAD_GAP, KeyRing

__all__ = ["CAS_ATTEMPTS", "CREATING_GRACE", "UNKNOWN_KEY_REREAD_GAP", "KeyRing"]

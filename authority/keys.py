"""Key ring records: what the authority remembers about each ticket protection key."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class KeyState(enum.IntEnum):
    """Lifecycle of a protection key (values match the admin proto's KeyState; CREATING is kept
    in the store only and never shown)."""

    ACTIVE = 1          # seals new tickets and opens tickets
    DECRYPT_ONLY = 2    # opens tickets until ``opens_until``, then is destroyed
    DESTROYED = 3       # gone from the device
    MISSING = 4         # recorded, but the device does not list it: opens nothing until it
                        # is back (then DECRYPT_ONLY) or an operator retires it
    CREATING = 5        # recorded before its creation in the device; ACTIVE or PENDING once
                        # created, or destroyed and dropped after a grace period (a crash, a
                        # timed-out create)
    PENDING = 6         # published, not yet sealing: every replica opens tickets under it, none
                        # seals with it; ACTIVE once every live replica reported it loaded or
                        # after ``keys.publish_delay``


@dataclass(frozen=True)
class KeyRecord:
    """Metadata of one key; the key itself lives only in the device."""

    key_id: bytes
    state: KeyState
    created_at: float
    seal_count: int = 0                   # seals reserved under the key (an upper bound)
    sealing_ended_at: float | None = None # when it stopped being the sealing key
    opens_until: float | None = None      # DECRYPT_ONLY: end of its decryption window
    destroyed_at: float | None = None

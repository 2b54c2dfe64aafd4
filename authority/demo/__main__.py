"""``python -m authority.demo``: run the resumption demo."""

from __future__ import annotations

import sys

from authority.demo import main

if __name__ == "__main__":
    sys.exit(main())

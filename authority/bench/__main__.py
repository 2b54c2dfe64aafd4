"""``python -m authority.bench``: the bench without the ``ticket-authority`` command."""

from __future__ import annotations

import sys

from authority.bench.runner import main

sys.exit(main())

"""History tables of the daemon (schedule state): filled by the daemon work."""

from __future__ import annotations

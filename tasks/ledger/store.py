"""The ledger: one object with each side's methods, on one Redis client (ledger/base.py)."""

from __future__ import annotations

from .producer_side import ProducerSide
from .reconciler_side import ReconcilerSide


class Ledger(ProducerSide, ReconcilerSide):  # ReconcilerSide is a TaskSide (it moves URLs as tasks do)
    """Reads and writes jobs: the producer's side (create, follow, report), the task's (transitions, leases) and
    the reconciler's (overdue and lost URLs), each in its own module."""

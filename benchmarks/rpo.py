"""RPO M×M benchmark (placeholder until ``fastpref.rpo_loss`` lands; see :func:`run`)."""

from __future__ import annotations

import fastpref


def run(ms, device, facts, *, modes, timing, memory):
    """``(rows, reason)``: rows for every M in ``ms``, or no rows and why."""
    if not hasattr(fastpref, "rpo_loss"):
        return [], "fastpref.rpo_loss does not exist yet (issue 4): no RPO rows"
    return [], "not wired yet"

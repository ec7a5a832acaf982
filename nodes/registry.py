"""The list of node classes the pack registers (one import per node module)."""

from __future__ import annotations


def node_classes() -> list[type]:
    return []

"""Smoke for bench/count_step_ops.py (run with the benchmark smoke): the counter sees the steps' operations, and
the orders between them that the fast capture is for hold (shared_output dispatches fewer than the plain step)."""

from __future__ import annotations

import pytest

from bench.count_step_ops import count


@pytest.mark.parametrize("kind", ["ncf", "bags"])
def test_shared_output_dispatches_fewer_operations_than_the_plain_step(kind):
    vanilla, plain, shared = (
        count(kind, False, v, "cpu", batch=32, rows=200) for v in ("vanilla", "plain", "shared_output")
    )
    assert 0 < vanilla < shared < plain

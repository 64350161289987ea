"""Property-based tests: random tensor sets, task counts and hyperparameters, every available backend."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mb_kernels.dispatch import BACKENDS, available_backends
from tests.cases import assert_matches_truth, random_task_grads, run_steps, truth

# The Triton interpreter runs a kernel program at a time in Python: give it fewer, smaller examples.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def _max_examples(backend: str) -> int:
    return 8 if backend == "triton" and INTERPRETED else 40


@pytest.mark.parametrize("backend", available_backends("cpu"))
def test_random_problems_match_reference(backend):
    fn = BACKENDS[backend].loader()
    size = st.one_of(st.integers(0, 8), st.integers(9, 700), st.sampled_from([1023, 1024, 1025, 4097]))
    max_tensors = 6 if backend == "triton" and INTERPRETED else 40

    @settings(max_examples=_max_examples(backend), deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        sizes=st.lists(size, min_size=1, max_size=max_tensors),
        num_tasks=st.integers(1, 6),
        dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
        strategy=st.sampled_from("ABC"),
        relax_factor=st.floats(0.0, 1.0),
        beta=st.one_of(st.just(0.0), st.floats(0.0, 0.999)),
        steps=st.integers(1, 4),
        seed=st.integers(0, 2**20),
    )
    def check(sizes, num_tasks, dtype, strategy, relax_factor, beta, steps, seed):
        grads = [random_task_grads(seed + s, sizes, num_tasks, dtype) for s in range(steps)]
        outs, ema = run_steps(fn, grads, sizes, relax_factor, beta, strategy)
        expected = truth(grads, sizes, relax_factor, beta, strategy)
        assert_matches_truth(outs, ema, expected, num_tasks, label=f"{backend} {sizes} T={num_tasks} {dtype}")

    check()


@pytest.mark.parametrize("backend", available_backends("cpu"))
@pytest.mark.parametrize("relax_factor", [0.0, 0.5])
def test_a_subnormal_moving_average_gives_a_finite_weight(backend, relax_factor):
    """Found by this file's search: a task whose gradient turns zero after one step, with beta = 2^-126, has a
    subnormal m_t; m_0/m_t overflowed float32, and r = 0 gave 0 * Inf = NaN where the weight is 1."""
    sizes = [0, 0, 0, 0, 0, 1]
    grads = [torch.tensor([[0.0085], [0.0179], [0.0129]]), torch.tensor([[0.0737], [-4.3363], [-0.0]])]
    fn = BACKENDS[backend].loader()
    outs, ema = run_steps(fn, grads, sizes, relax_factor, 1.175494351e-38, "B")
    assert 0 < float(ema[-1, 2]) < 2.0**-126  # the subnormal average
    expected = truth(grads, sizes, relax_factor, 1.175494351e-38, "B")
    assert_matches_truth(outs, ema, expected, 3, label=backend)

"""End to end: one training step of the paper's multi-task recommender (3 tasks), per way of combining tasks.

A step is ``optimizer.zero_grad(set_to_none=True)``, the forward and the three BCE losses, the backward
pass(es) with the gradient combination, then ``Adam.step()`` over all parameters; on CUDA each timed step
ends with a synchronise (bench.common.run_timed). Groups are ``e2e <device> batch=<B>``; rows:

* ``vanilla``: Vanilla-Multi, one backward of the summed loss (the floor MetaBalance is held against);
* ``original-style``: one retain_graph backward per task + the per-tensor Python loop
  (bench.common.OriginalStyleMetaBalance);
* ``torch-rechub``: Torch-RecHub's MetaBalance (optional dependency);
* ``fused=None``: ``MetaBalance(shared, fused=None)`` (the default choice; the backend it picked is in
  extra_info), and ``backend=<name>`` for every backend available on the device.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

from bench import common
from bench.recsys import build_model, random_batches, task_losses, task_losses_and_shared
from mb_kernels import MetaBalance
from mb_kernels.dispatch import available_backends

NUM_BATCHES = 8


def batch_sizes() -> list[int]:
    return [32] if common.QUICK else [256, 4096]


def variants(device: str) -> list[str]:
    names = ["vanilla", "original-style", "torch-rechub", "fused=None", "fused=None+shared_output"]
    for name in available_backends(device):
        if not (device == "cpu" and name == "triton"):  # the interpreter is a test vehicle, not a fast path
            names.append(f"backend={name}")
    return names


def _cases():
    return [
        pytest.param(device, batch, variant, id=f"{device}-b{batch}-{variant}")
        for device in common.devices()
        for batch in batch_sizes()
        for variant in variants(device)
    ]


def _rechub_vs_ours(rechub_cls, model, batches, steps: int = 3) -> dict:
    """Torch-RecHub against MetaBalance(fused=False) from identical models on identical batches (no updates)."""
    theirs_model, ours_model = copy.deepcopy(model), copy.deepcopy(model)
    theirs = rechub_cls(theirs_model.shared_parameters(), relax_factor=common.RELAX_FACTOR, beta=common.BETA)
    ours = MetaBalance(ours_model.shared_parameters(), relax_factor=common.RELAX_FACTOR, beta=common.BETA, fused=False)
    for step in range(steps):
        for m, balancer in ((theirs_model, theirs), (ours_model, ours)):
            m.zero_grad(set_to_none=True)
            torch.manual_seed(step)  # the same dropout masks for both
            balancer.step(task_losses(m, batches[step % len(batches)]))
    pairs = list(zip(theirs_model.shared_parameters(), ours_model.shared_parameters()))
    per_param = [common.relative_difference(a.grad, b.grad)["rel_l2"] for a, b in pairs]
    overall = common.relative_difference(
        torch.cat([a.grad.flatten() for a, _ in pairs]), torch.cat([b.grad.flatten() for _, b in pairs])
    )
    worst = max(range(len(per_param)), key=per_param.__getitem__)
    return {
        **overall,
        "worst_param_rel_l2": per_param[worst],
        "worst_param_shape": list(pairs[worst][1].shape),
        "steps": steps,
    }


def _make_step(device: str, variant: str, model, batches, info: dict, compare_rechub: bool = True):
    """One training step of ``model`` combining the task losses the ``variant`` way (no synchronise)."""
    shared = model.shared_parameters()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    which = itertools.cycle(range(len(batches)))
    if variant == "vanilla":

        def combine(losses):
            sum(losses).backward()

    elif variant == "original-style":
        combine = common.OriginalStyleMetaBalance(shared).step
    elif variant == "torch-rechub":
        rechub_cls = common.require_rechub(info)
        if compare_rechub:
            info["rechub_vs_ours"] = _rechub_vs_ours(rechub_cls, model, batches)
        combine = rechub_cls(shared, relax_factor=common.RELAX_FACTOR, beta=common.BETA).step
    else:
        kwargs = {"backend": variant.removeprefix("backend=")} if variant.startswith("backend=") else {"fused": None}
        balancer = MetaBalance(shared, relax_factor=common.RELAX_FACTOR, beta=common.BETA, **kwargs)
        info["backend"] = balancer.backends.get(device)
        combine = balancer.step
        if variant.endswith("+shared_output"):

            def step():
                optimizer.zero_grad(set_to_none=True)
                losses, h = task_losses_and_shared(model, batches[next(which)])
                balancer.step(losses, shared_output=h)
                optimizer.step()

            return step

    def step():
        optimizer.zero_grad(set_to_none=True)
        combine(task_losses(model, batches[next(which)]))
        optimizer.step()

    return step


def _model_info(device: str, batch_size: int, model, description: str) -> dict:
    return dict(
        device=device,
        batch=batch_size,
        model=description,
        shared_numel=sum(p.numel() for p in model.shared_parameters()),
        num_params=sum(p.numel() for p in model.parameters()),
        tasks=3,
        optimizer="Adam (included in the step)",
        threads=torch.get_num_threads(),
    )


@pytest.mark.parametrize(("device", "batch_size", "variant"), _cases())
def test_train_step(benchmark, device, batch_size, variant):
    model, description = build_model(device, quick=common.QUICK)
    model.train()
    batches = random_batches(batch_size, NUM_BATCHES, device, quick=common.QUICK)
    benchmark.group = f"e2e {device} batch={batch_size}"
    info = benchmark.extra_info
    info.update(kind="e2e", variant=variant, **_model_info(device, batch_size, model, description))
    step = _make_step(device, variant, model, batches, info)
    common.run_timed(benchmark, step, device, min_rounds=5)


@pytest.mark.parametrize(
    ("device", "batch_size"), [pytest.param(d, b, id=f"{d}-b{b}") for d in common.devices() for b in batch_sizes()]
)
def test_train_step_interleaved(benchmark, device, batch_size):
    """All variants in alternation, one step each per round, first mover rotating: on a machine shared with
    other work, slow phases hit every variant alike, so the ratios are steadier than across separate rows.
    Per-variant min and median step times are in ``extra_info["interleaved"]``."""
    model, description = build_model(device, quick=common.QUICK)
    model.train()
    batches = random_batches(batch_size, NUM_BATCHES, device, quick=common.QUICK)
    benchmark.group = f"e2e-interleaved {device} batch={batch_size}"
    info = benchmark.extra_info
    info.update(kind="e2e-interleaved", **_model_info(device, batch_size, model, description))
    names = variants(device)
    if common.load_rechub()[0] is None:
        names.remove("torch-rechub")
    backends: dict[str, str] = {}
    steps = {}
    for name in names:
        variant_info: dict = {}
        steps[name] = _make_step(device, name, copy.deepcopy(model), batches, variant_info, compare_rechub=False)
        backends[name] = variant_info.get("backend")
    rows = common.run_interleaved(benchmark, steps, device, min_rounds=7, max_rounds=60)
    info["interleaved"] = {name: {**row, "backend": backends[name]} for name, row in rows.items()}

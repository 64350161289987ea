"""Production robustness on every available backend: AMP, non-finite gradients, bad input, memory."""

from __future__ import annotations

import copy

import pytest
import torch

from mb_kernels import MetaBalance
from mb_kernels.backends.contract import Hyperparameters
from mb_kernels.dispatch import BACKENDS, available_backends
from mb_kernels.layout import FlatLayout
from tests.cases import random_task_grads, run_steps
from tests.models import TinyMultiTask, batch

CPU_BACKENDS = available_backends("cpu")
CUDA_BACKENDS = available_backends("cuda") if torch.cuda.is_available() else []
# AMP runs on both device types: (device, backend) pairs.
AMP_CASES = [("cpu", b) for b in CPU_BACKENDS] + [("cuda", b) for b in CUDA_BACKENDS]


def _poison_task(model, task: int, value: float):
    """Make task ``task``'s gradient into the shared bottom non-finite, via a hook on its tower input."""
    tower = model.towers[task]
    return tower.register_forward_pre_hook(
        lambda module, args: (args[0].register_hook(lambda g: g * value) and None) or None
    )


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_finite_kernel_input_keeps_ema_and_poisons_output(backend):
    sizes = [5, 300, 1]
    grads = random_task_grads(0, sizes, 3, torch.float32)
    grads[1, 2] = float("nan")  # task 1, tensor 0
    grads[2, 200] = float("inf")  # task 2, tensor 1
    fn = BACKENDS[backend].loader()
    warm = [random_task_grads(1, sizes, 3, torch.float32)]
    _, ema_before = run_steps(fn, warm, sizes, 0.7, 0.9, "C")
    _, ema_after = run_steps(fn, [*warm, grads], sizes, 0.7, 0.9, "C")
    assert ema_after[0, 1] == ema_before[0, 1] and ema_after[1, 2] == ema_before[1, 2]
    changed = torch.ones_like(ema_after, dtype=torch.bool)
    changed[0, 1] = changed[1, 2] = False
    assert (ema_after[changed] != ema_before[changed]).all()
    outs, _ = run_steps(fn, [*warm, grads], sizes, 0.7, 0.9, "C")
    out = outs[-1]
    assert not torch.isfinite(out[:5]).all() and not torch.isfinite(out[5:305]).all()
    assert torch.isfinite(out[305:]).all()


@pytest.mark.parametrize("case", AMP_CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def test_grad_scaler_overflow_skips_step_and_keeps_every_ema(case):
    device, backend = case
    torch.manual_seed(0)
    model = TinyMultiTask().to(device)
    mb = MetaBalance(model.shared_parameters(), backend=backend, skip_nonfinite_steps=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**10)
    items, labels = (x.to(device) for x in batch(0))
    for _ in range(2):  # healthy steps
        optimizer.zero_grad(set_to_none=True)
        mb.step([scaler.scale(loss) for loss in model.losses(items, labels)])
        scaler.step(optimizer)
        scaler.update()
    ema = {p: mb.state[p]["norm_ema"].clone() for p in model.shared_parameters()}
    params = copy.deepcopy(model.state_dict())
    scale = scaler.get_scale()
    handle = _poison_task(model, 2, float("inf"))  # one auxiliary overflows
    optimizer.zero_grad(set_to_none=True)
    mb.step([scaler.scale(loss) for loss in model.losses(items, labels)])
    scaler.step(optimizer)
    scaler.update()
    handle.remove()
    assert scaler.get_scale() < scale, "the scaler must have seen the overflow"
    for name, value in model.state_dict().items():
        assert torch.equal(value, params[name]), f"{name} changed on a skipped step"
    for p in model.shared_parameters():
        assert torch.equal(mb.state[p]["norm_ema"], ema[p]), "an EMA moved on a skipped step"


@pytest.mark.parametrize("case", AMP_CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def test_fp16_autocast_with_grad_scaler_trains(case):
    device, backend = case
    torch.manual_seed(1)
    model = TinyMultiTask().to(device)
    mb = MetaBalance(model.shared_parameters(), backend=backend, skip_nonfinite_steps=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler(device)
    items, labels = (x.to(device) for x in batch(0, size=256))
    first = None
    for _ in range(30):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.float16):
            losses = model.losses(items, labels)
        first = first if first is not None else losses[0].item()
        mb.step([scaler.scale(loss) for loss in losses])
        scaler.step(optimizer)
        scaler.update()
    assert model.losses(items, labels)[0].item() < 0.8 * first


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_parameters_and_gradients(backend, dtype):
    torch.manual_seed(2)
    model = TinyMultiTask(dtype=dtype)
    reference = copy.deepcopy(model).double()
    mb = MetaBalance(model.shared_parameters(), backend=backend)
    mb_ref = MetaBalance(reference.shared_parameters(), fused=False)
    for step in range(3):
        items, labels = batch(step, dtype=dtype)
        model.zero_grad(set_to_none=True)
        reference.zero_grad(set_to_none=True)
        mb.step(model.losses(items, labels))
        mb_ref.step(reference.losses(items, labels.double()))
        for p, q in zip(model.shared_parameters(), reference.shared_parameters()):
            assert p.grad is None or p.grad.dtype == dtype
            assert mb.state[p]["norm_ema"].dtype == torch.float32
            if p.grad is not None:
                # The forward/backward itself ran in half precision: compare at the half-precision level.
                torch.testing.assert_close(p.grad.double(), q.grad, rtol=0.1, atol=0.05)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bad_input_raises_before_touching_state_on_every_backend(backend):
    model = TinyMultiTask()
    mb = MetaBalance(model.shared_parameters(), backend=backend)
    mb.step(model.losses(*batch(0)))
    ema = {p: mb.state[p]["norm_ema"].clone() for p in model.shared_parameters()}
    grads = {p: None if p.grad is None else p.grad.clone() for p in model.parameters()}
    losses = model.losses(*batch(1))
    for bad, error in [
        ([], ValueError),
        (losses[:2], ValueError),
        ([losses[0].detach(), *losses[1:]], ValueError),
        ([losses[0].expand(3), *losses[1:]], ValueError),
    ]:
        with pytest.raises(error):
            mb.step(bad)
    for p in model.parameters():
        assert (p.grad is None and grads[p] is None) or torch.equal(p.grad, grads[p])
    for p in model.shared_parameters():
        assert torch.equal(mb.state[p]["norm_ema"], ema[p])


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_thousand_steps_do_not_grow_memory(backend):
    torch.manual_seed(3)
    model = TinyMultiTask()
    mb = MetaBalance(model.shared_parameters(), backend=backend)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    batches = [batch(i) for i in range(8)]
    steps = 100 if backend == "triton" else 1000  # the Triton interpreter is ~100x slower per step
    baseline = None
    for step in range(steps):
        if step == steps // 5:
            baseline = _rss_bytes()
        optimizer.zero_grad(set_to_none=True)
        losses = model.losses(*batches[step % 8])
        mb.step(losses)
        optimizer.step()
    growth = _rss_bytes() - baseline
    assert growth < 8 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB over {steps - steps // 5} steps"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_cuda_training_steps_match_reference(backend):
    torch.manual_seed(4)
    model = TinyMultiTask().cuda()
    twin = copy.deepcopy(model)
    mb = MetaBalance(model.shared_parameters(), backend=backend)
    mb_ref = MetaBalance(twin.shared_parameters(), backend="torch")
    for step in range(4):
        items, labels = (x.cuda() for x in batch(step))
        for m, balancer in ((model, mb), (twin, mb_ref)):
            m.zero_grad(set_to_none=True)
            balancer.step(m.losses(items, labels))
        for p, q in zip(model.parameters(), twin.parameters()):
            assert (p.grad is None) == (q.grad is None)
            if p.grad is not None:
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)
    for p, q in zip(model.shared_parameters(), twin.shared_parameters()):
        torch.testing.assert_close(mb.state[p]["norm_ema"], mb_ref.state[q]["norm_ema"], rtol=2e-5, atol=0.0)


def test_fused_none_prefers_fused_backends():
    model = TinyMultiTask()
    mb = MetaBalance(model.shared_parameters())
    expected = "cpu" if "cpu" in CPU_BACKENDS else "torch"
    assert mb.backends == {"cpu": expected}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fused_none_on_cuda_prefers_the_cuda_op():
    """On CUDA tensors fused=None takes the CUDA C++ op when it is built (faster than Triton in every case
    measured), else Triton; `mb.backends` says which."""
    model = TinyMultiTask().cuda()
    mb = MetaBalance(model.shared_parameters())
    expected = next((name for name in ("cuda", "triton") if name in CUDA_BACKENDS), "torch")
    assert mb.backends == {"cuda": expected}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_thousand_cuda_steps_do_not_grow_device_memory(backend):
    torch.manual_seed(5)
    model = TinyMultiTask().cuda()
    mb = MetaBalance(model.shared_parameters(), backend=backend)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    batches = [tuple(x.cuda() for x in batch(i)) for i in range(8)]
    for step in range(1000):
        if step == 100:
            torch.cuda.synchronize()
            baseline = torch.cuda.memory_allocated()
        optimizer.zero_grad(set_to_none=True)
        mb.step(model.losses(*batches[step % 8]))
        optimizer.step()
    torch.cuda.synchronize()
    growth = torch.cuda.memory_allocated() - baseline
    assert growth <= 64 * 1024, f"CUDA memory grew by {growth} bytes over 900 steps"


@pytest.mark.parametrize(
    ("device", "backend"), [("cpu", b) for b in CPU_BACKENDS] + [("cuda", b) for b in CUDA_BACKENDS]
)
def test_a_layout_that_does_not_match_the_workspace_is_refused(device, backend):
    """A backend called directly with a layout wider or narrower than ``task_grads``: an error, nothing written
    (the CUDA op's chunk table comes from the layout alone, so without a check it would read and write past the
    tensors)."""
    balance = BACKENDS[backend].loader()
    task_grads = torch.randn(3, 100, device=device)
    for sizes in ([120], [60, 20]):
        layout = FlatLayout.from_sizes(sizes, device)
        norm_ema = torch.ones(len(sizes), 3, device=device)
        out = torch.full((100,), 7.0, device=device)
        with pytest.raises((ValueError, RuntimeError)):
            balance(task_grads, norm_ema, out, layout, Hyperparameters(0.5, 0.9, "A"))
        assert torch.equal(out, torch.full_like(out, 7.0))
        assert torch.equal(norm_ema, torch.ones_like(norm_ema))

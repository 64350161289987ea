"""A steady-state step reads no tensor value on the host (the condition for CUDA-graph capture and for no host
synchronisation on GPU), checked on CPU: while the step runs, every way Python turns a tensor into a host value
(``item``, ``tolist``, ``bool``, ``int``, ``float``, ``__index__``, ``numpy``) raises, and so does every ATen op
that needs one (``_local_scalar_dense``, ``nonzero``, ``unique``, ``masked_select``, ``equal``, ``is_nonzero``,
``bincount``, boolean-mask indexing, ``repeat_interleave`` without an output size), a tensor made from Python
values (``torch.tensor``), and any host-device copy. The watcher sees the ops the caller's thread dispatches, the
autograd engine's backward included (CPU backward runs on it; on CUDA, the tier also turns CUDA's own sync check
to "error"); it cannot see syncs inside an ATen kernel, so the ops that have them are refused by name. The step must
also build nothing (no new bucket, no new plan): a plan build copies small host tensors to the device.

Dense tables (balanced by rows or in the workspace) and dense parameters take no host read, in the plain step and
with ``shared_output``. Sparse tables take one by design (the size of a sparse gradient is a host value): the
positive control of the method half; a custom Function whose backward calls ``nonzero`` is the op half's.
"""

from __future__ import annotations

import contextlib
from unittest import mock

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from experiments.recsys.model import MultiTaskNCF
from mb_kernels import MetaBalance
from mb_kernels.dispatch import available_backends
from tests.models import IdentityWithBackward
from tests.test_embedding_bags import Bags
from tests.test_embedding_bags import _batch as _bag_batch
from tests.test_shared_output import EmbeddingCases, MMoE, SharedBottom, T, TwoOutputs, _batch

_HOST_VALUE_OPS = (
    "aten._local_scalar_dense",
    "aten.nonzero",
    "aten.item",
    "aten.is_nonzero",
    "aten.equal",
    "aten.masked_select",
    "aten.unique",
    "aten._unique",
    "aten.bincount",
    "aten.lift_fresh",  # torch.tensor(python values): made on the host
)
_HOST_VALUE_METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy")


class HostRead(AssertionError):
    pass


def _tensors(value):
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


class _RefuseHostValueOps(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        if name.startswith(_HOST_VALUE_OPS):
            raise HostRead(f"{name} reads a tensor value on the host")
        tensors = _tensors([*args, *kwargs.values()])
        if name.startswith(("aten.index.", "aten.index_put")) and any(t.dtype == torch.bool for t in _tensors(args[1])):
            raise HostRead(f"{name} with a boolean mask: its size is a host value")
        if name.startswith("aten.repeat_interleave") and kwargs.get("output_size") is None and len(args) < 3:
            raise HostRead(f"{name} without output_size reads the repeats on the host")
        devices = {t.device.type for t in tensors} | {str(kwargs.get("device", "")).split(":")[0]} - {""}
        if name.startswith(("aten._to_copy", "aten.copy_")) and "cpu" in devices and len(devices) > 1:
            # A host-device copy: it blocks on pageable memory and cannot be captured in a CUDA graph.
            raise HostRead(f"{name} copies between the host and the device")
        return func(*args, **kwargs)


@contextlib.contextmanager
def no_host_reads(device: str = "cpu"):
    def refuse(name):
        def method(self, *args, **kwargs):
            raise HostRead(f"Tensor.{name} reads a tensor value on the host")

        return method

    with contextlib.ExitStack() as stack:
        for name in _HOST_VALUE_METHODS:  # restored exactly (inherited methods stay inherited)
            stack.enter_context(mock.patch.object(torch.Tensor, name, refuse(name)))
        if device == "cuda":
            previous = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("error")
            stack.callback(torch.cuda.set_sync_debug_mode, previous)
        stack.enter_context(_RefuseHostValueOps())
        yield


class _Recommender(torch.nn.Module):
    """The app's network (four 64-d tables looked up by users and items, MLP bottom, towers), small."""

    def __init__(self, sparse: bool = False):
        super().__init__()
        self.net = MultiTaskNCF(num_users=60, num_items=50, num_tasks=T, embed_dim=8, mlp_layers=(8, 4))
        for table in (self.net.user_mf, self.net.item_mf, self.net.user_mlp, self.net.item_mlp):
            table.sparse = sparse

    def shared_parameters(self):
        return self.net.shared_parameters()

    def losses(self, items, labels):
        h = self.net.shared(items % 60, items)
        out = [
            torch.nn.functional.binary_cross_entropy_with_logits(tower(h).squeeze(-1), labels[:, t])
            for t, tower in enumerate(self.net.towers)
        ]
        return out, h


class _Bags(Bags):
    """Sum and mean bags balanced by rows, a max bag through the workspace."""

    def __init__(self):
        super().__init__(by_index=False)

    def losses(self, items, labels):
        return super().losses(_bag_batch(int(items[0]), items.device.type))


class _VariableBags(torch.nn.Module):
    """A sum bag table fed a 1-D id list whose length varies from batch to batch (33, 36, 35 ids: one padded count,
    so one plan for the three steps)."""

    def __init__(self):
        super().__init__()
        self.table = torch.nn.EmbeddingBag(100, 6, mode="sum")
        self.bottom = torch.nn.Linear(6, 5)
        self.towers = torch.nn.ModuleList(torch.nn.Linear(5, 1) for _ in range(T))
        self.calls = 0

    def shared_parameters(self):
        return [self.table.weight, *self.bottom.parameters()]

    def losses(self, items, labels):
        count = (33, 36, 35)[self.calls % 3]
        self.calls += 1
        gen = torch.Generator().manual_seed(self.calls)
        ids = torch.randint(0, 100, (count,), generator=gen)
        offsets = torch.sort(torch.randint(0, count, (8,), generator=gen)).values
        offsets[0] = 0
        h = torch.tanh(self.bottom(self.table(ids.to(items.device), offsets.to(items.device))))
        out = [
            torch.nn.functional.binary_cross_entropy_with_logits(tower(h).squeeze(-1), labels[:8, t])
            for t, tower in enumerate(self.towers)
        ]
        return out, h


def _steps(model_cls, device, backend, shared_output, sparse=False):
    """Two warm-up steps (buckets and plans built), then a third under the watcher, which must build nothing."""
    torch.manual_seed(0)
    model = (model_cls(sparse=True) if sparse else model_cls()).double().to(device)
    mb = MetaBalance(model.shared_parameters(), relax_factor=0.7, beta=0.9, backend=backend)
    for step in range(3):
        model.zero_grad(set_to_none=True)
        items, labels = (x.to(device) for x in _batch(step))
        losses, h = model.losses(items, labels)
        built = (mb._buckets, [(table, list(table._plans)) for _, table in mb._tables or []])
        with no_host_reads(device) if step == 2 else contextlib.nullcontext():
            mb.step(losses, shared_output=h) if shared_output else mb.step(losses)
        if step == 2:
            assert mb._buckets is built[0], "the watched step rebuilt the buckets"
            assert all(list(table._plans) == plans for table, plans in built[1]), "the watched step built a plan"
    return model


DEVICE_BACKENDS = [
    (device, backend)
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for backend in available_backends(device)  # on CPU with the Triton interpreter too: the launcher is the same
]


@pytest.mark.usefixtures("bottom_backward")  # CUDA's batched bottom and CPU's per-task one, on every device
@pytest.mark.parametrize(("device", "backend"), DEVICE_BACKENDS)
@pytest.mark.parametrize("shared_output", [False, True], ids=["plain", "shared_output"])
@pytest.mark.parametrize(
    "model_cls", [SharedBottom, MMoE, TwoOutputs, EmbeddingCases, _Recommender, _Bags, _VariableBags]
)
def test_a_steady_state_step_reads_no_tensor_value_on_the_host(model_cls, shared_output, device, backend):
    """And copies nothing between host and device (on CUDA: the conditions for capturing it in a CUDA graph)."""
    model = _steps(model_cls, device, backend, shared_output)
    # The watched step did its work: every balanced parameter got a finite gradient.
    for p in model.shared_parameters():
        assert p.grad is not None and torch.isfinite(p.grad.to_dense()).all()


@pytest.mark.parametrize("shared_output", [False, True], ids=["plain", "shared_output"])
def test_sparse_tables_take_their_one_host_read(shared_output):
    """The positive control: the watcher catches the sparse result's size read (docs/design.md §4)."""
    with pytest.raises(HostRead, match="tolist"):
        _steps(_Recommender, "cpu", "cpu", shared_output, sparse=True)


def _read_nonzero(grad):
    """A backward that reads a value on the host (the op half of the watcher must see it)."""
    torch.nonzero(grad)
    return grad


class _SyncingBottom(SharedBottom):
    def losses(self, items, labels):
        h = IdentityWithBackward.apply(self.bottom(self.embedding(items)), _read_nonzero)
        out = [
            torch.nn.functional.binary_cross_entropy_with_logits(t(h).squeeze(-1), labels[:, i])
            for i, t in enumerate(self.towers)
        ]
        return out, h


def test_the_watcher_sees_the_backward_ops():
    """The positive control of the op half: an op with a host read inside the autograd engine's backward."""
    with pytest.raises((HostRead, RuntimeError), match="nonzero"):
        _steps(_SyncingBottom, "cpu", "cpu", shared_output=False)


def test_the_watcher_restores_tensor_methods():
    before = {name: name in vars(torch.Tensor) for name in _HOST_VALUE_METHODS}
    with contextlib.suppress(HostRead), no_host_reads():
        torch.ones(()).item()
    assert {name: name in vars(torch.Tensor) for name in _HOST_VALUE_METHODS} == before
    assert torch.ones(()).item() == 1.0 and torch.tensor([2]).tolist() == [2]

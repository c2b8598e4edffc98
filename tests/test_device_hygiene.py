"""Device hygiene (issue 16, item 2): a training step makes no host sync and creates no tensor on the wrong device.

Per-step work may not read a device value back on the host: train_one_epoch reads its running loss only every
``check_every`` steps (and at the epoch's last step), and a topology update (RigL's every ``update_every``
steps) may sync. BSR-Net rewires at every step; its one allowed sync is :meth:`BSRNetEngine.regrowth_counts`
(the dormant counts from which the CPU draws the regrowth).

Two checks of the same runs (dense, RigL, BSR-Net, AGENT):

* on CUDA, the real one: every step after the first runs under ``torch.cuda.set_sync_debug_mode("error")``,
  which raises at any synchronising call, blocking host-device copies included;
* on any machine, a count of the syncs visible without CUDA: the ops that read a value back
  (``item``/``int``/``float``/``bool`` of a tensor, ``nonzero``, boolean indexing, ``masked_select``,
  ``unique``) seen by a dispatch mode, and ``tolist``/``numpy`` calls. It cannot see copies between devices
  (on the CPU there are none), which only the CUDA check covers.
"""

from __future__ import annotations

import inspect
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import robust_sparse.run_setup as run_setup
import robust_sparse.train as train_module
from robust_sparse.sparse.bsrnet import BSRNetEngine
from robust_sparse.train import fit

# Sparse runs keep the dense kernels here: the CSR kernels (train.sparse_kernels) are CPU-only and read their
# structure and data on the host by design (numpy views, nonzero on a topology change); a CUDA run never
# takes them (auto is off there, on is refused), and tests/test_sparse_kernels.py covers them.
RUNS = {
    "dense": (),
    "rigl": ("sparsity.method=rigl", "sparsity.density=0.3", "sparsity.update_every=3", "train.sparse_kernels=off"),
    "bsrnet": ("sparsity.method=bsrnet", "sparsity.density=0.3", "sparsity.distribution=erk",
               "optim.optimizer=sgdw", "train.sparse_kernels=off"),
    # fixed c_t: the correction is on from the first epoch (g_tilde from 2 batches)
    "agent": ("agent.enabled=true", "agent.estimator=fixed", "agent.fixed_c=0.5", "agent.full_grad_batches=2",
              "agent.probe_chunks=0"),
}
CHECK_EVERY = inspect.signature(train_module.train_one_epoch).parameters["check_every"].default

aten = torch.ops.aten
READ_BACK = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.nonzero.default,
             aten.masked_select.default, aten._unique2.default, aten.unique_dim.default,
             aten.unique_consecutive.default}
INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}


def _where() -> str:
    frames = [f for f in traceback.extract_stack()[:-2] if "robust_sparse" in f.filename or "attacks" in f.filename]
    return " <- ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} {f.name}" for f in reversed(frames[-4:]))


class SyncCounter(TorchDispatchMode):
    """Records every op that reads a tensor's value back to the host (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def record(self, what: str) -> None:
        self.calls.append(f"{what} at {_where()}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        masks = func in INDEXING and any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
                                         for i in args[1] if i is not None)
        if func in READ_BACK or masks:  # boolean indexing: the mask's nonzero positions are read back
            self.record(str(func))
        return func(*args, **(kwargs or {}))


class StepWatch:
    """Wraps train_one_epoch's batch iteration (through ``robust_sparse.train.progress_bar``): ``guard(True)``
    before a watched step fetches its batch, ``guard(False)`` after its body. A step is watched unless it reads
    the loss back, updates the topology (not BSR-Net, whose every step does), or is the run's first (warm-up)
    when ``skip_first``."""

    def __init__(self, guard, skip_first: bool) -> None:
        self.guard, self.skip_first = guard, skip_first
        self.masker = None
        self.steps = 0  # over the run
        self.watched = 0
        self.on = False

    def excluded(self, step: int, length: int) -> bool:
        engine = getattr(self.masker, "engine", None)
        update = (not isinstance(engine, BSRNetEngine) and hasattr(engine, "is_update_step")
                  and engine.is_update_step(self.masker.step + 1))
        return (step % CHECK_EVERY == 0 or step == length or update or (self.skip_first and self.steps == 1))

    def set(self, on: bool) -> None:
        if on != self.on:
            self.on = on
            self.guard(on)

    def wrap(self, bar, loader):
        watch = self

        class Watched:
            def set_postfix(self, **values):
                bar.set_postfix(**values)

            def __iter__(self):
                batches = iter(bar)
                try:
                    for step in range(1, len(loader) + 1):
                        watch.steps += 1
                        watched = not watch.excluded(step, len(loader))
                        watch.watched += watched
                        watch.set(watched)
                        batch = next(batches)
                        yield batch
                        watch.set(False)
                finally:
                    watch.set(False)

        return Watched()


def _fit_watched(monkeypatch, config, guard, *, skip_first: bool, pause=None):
    """``fit(config)`` with every eligible training step inside ``guard``; ``pause`` (a context manager
    factory) wraps BSR-Net's allowed sync."""
    watch = StepWatch(guard, skip_first)
    real_bar, real_build = train_module.progress_bar, run_setup.build_sparsity

    def progress_bar(iterable, **kwargs):
        bar = real_bar(iterable, **kwargs)
        return watch.wrap(bar, iterable) if kwargs.get("desc", "").startswith("epoch") else bar

    def build_sparsity(*args, **kwargs):
        watch.masker = real_build(*args, **kwargs)
        return watch.masker

    real_counts = BSRNetEngine.regrowth_counts

    def regrowth_counts(self, *args, **kwargs):
        with pause():
            return real_counts(self, *args, **kwargs)

    monkeypatch.setattr(train_module, "progress_bar", progress_bar)
    monkeypatch.setattr(run_setup, "build_sparsity", build_sparsity)
    if pause is not None:
        monkeypatch.setattr(BSRNetEngine, "regrowth_counts", regrowth_counts)
    try:
        result = fit(config)
    finally:
        watch.set(False)
    assert watch.watched >= 4, f"only {watch.watched} of {watch.steps} steps were watched"
    if config.agent.enabled:  # the correction (and its cosine) really ran in the watched steps
        assert result.metrics["agent_cosine"].notna().all()
    return watch


class _Paused:
    def __init__(self, counter: SyncCounter, state: dict) -> None:
        self.counter, self.state = counter, state

    def __enter__(self):
        self.was = self.state["on"]
        if self.was:
            self.counter.__exit__(None, None, None)
            self.state["on"] = False

    def __exit__(self, *exc):
        if self.was:
            self.counter.__enter__()
            self.state["on"] = True


@pytest.mark.parametrize("run", list(RUNS))
def test_no_host_sync_in_a_training_step(run, tiny_config, monkeypatch):
    counter = SyncCounter()
    state = {"on": False}

    def guard(on: bool) -> None:
        if on:
            counter.__enter__()
        else:
            counter.__exit__(None, None, None)
        state["on"] = on

    def counted(name):
        real = getattr(torch.Tensor, name)

        def method(self, *args, **kwargs):
            if state["on"]:
                counter.record(f"Tensor.{name}")
            return real(self, *args, **kwargs)

        return method

    for name in ("tolist", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, counted(name))
    _fit_watched(monkeypatch, tiny_config(*RUNS[run], "eval.n_examples=0"), guard, skip_first=False,
                 pause=lambda: _Paused(counter, state))
    assert counter.calls == [], "host syncs in training steps:\n" + "\n".join(counter.calls[:10])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: torch.cuda.set_sync_debug_mode only "
                    "reports syncs of CUDA work (the CPU test counts the syncs visible without it)")
@pytest.mark.parametrize("run", list(RUNS))
def test_no_host_sync_in_a_cuda_training_step(run, tiny_config, monkeypatch):
    previous = torch.cuda.get_sync_debug_mode()

    def guard(on: bool) -> None:
        torch.cuda.set_sync_debug_mode("error" if on else previous)

    class Paused:
        def __enter__(self):
            self.mode = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode(0)

        def __exit__(self, *exc):
            torch.cuda.set_sync_debug_mode(self.mode)

    try:
        _fit_watched(monkeypatch, tiny_config(*RUNS[run], "eval.n_examples=0", "device=cuda"), guard,
                     skip_first=True, pause=Paused)
    finally:
        torch.cuda.set_sync_debug_mode(previous)

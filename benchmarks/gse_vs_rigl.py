"""Cost of one topology update: GSE (gradients only at sampled candidates) against RigL (dense gradient).

One wide ``nn.Linear(width, width)`` layer at ``--density`` (default 1%, i.e. 99% sparse), built through
:func:`robust_sparse.sparse.build_sparsity` (uniform allocation, so both methods see the same layer), a score
batch of ``--batch`` random inputs (the batch size only scales the activations; what grows with width is the
weight-shaped work). One update is, for each method, everything it needs beyond the normal training step:

* **RigL**: forward and ``loss.backward()`` on the batch with the masker's hooks handing the dense weight
  gradient to the engine (autograd materialises the dense ``width x width`` gradient; the hook keeps a copy),
  then :meth:`PruneGrowEngine.after_step` (magnitude prune, top-|g| growth over all dormant positions);
* **GSE**: :meth:`GSEEngine.after_step`: forward with module hooks, ``autograd.grad`` w.r.t. the layer output,
  GraBo sampling of ``gamma * nnz`` candidates, their gradients as sums of products, grow-then-prune.

Each (method, width) runs in a fresh subprocess. Time: the median of ``--repeats`` updates after one warm-up.
Memory: the peak resident-set increment during an update over the resident size just before it (the
kernel's high-water mark ``VmHWM`` is reset through ``/proc/self/clear_refs`` before each update; where that
is not allowed a 0.2 ms polling thread on ``VmRSS`` is used instead). Both include the persistent mask and
weights only through their changes, so the numbers are the update's own working memory. The masker's
every-step re-mask (``SparseMasker.apply``, common to every method) runs after each measured update, outside
the measurement.

    python benchmarks/gse_vs_rigl.py --widths 1024 2048 4096 8192
    python benchmarks/gse_vs_rigl.py --smoke          # a seconds-long run at tiny sizes (a test runs it)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


class PeakRSS:
    """Peak resident-set increment (MiB) over the resident size at ``__enter__``."""

    def __enter__(self):
        self.base = _status_kib("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as refs:
                refs.write("5")  # resets VmHWM to the current RSS
            self.poll = None
        except OSError:
            self.peak, self.stop = self.base, False
            self.poll = threading.Thread(target=self._poll, daemon=True)
            self.poll.start()
        return self

    def _poll(self):
        while not self.stop:
            self.peak = max(self.peak, _status_kib("VmRSS"))
            time.sleep(0.0002)

    def __exit__(self, *exc):
        if self.poll is None:
            self.peak = _status_kib("VmHWM")
        else:
            self.stop = True
            self.poll.join()
        self.mib = (self.peak - self.base) / 1024


def child(method: str, width: int, density: float, batch: int, repeats: int) -> dict:
    import torch
    from torch import nn
    from torch.nn import functional as F

    from robust_sparse.config import load_config
    from robust_sparse.sparse import build_sparsity

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(width, width))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    inputs, labels = torch.randn(batch, width), torch.randint(width, (batch,))
    config = load_config(None, [f"sparsity.method={method}", f"sparsity.density={density}",
                                "sparsity.distribution=uniform", "sparsity.update_every=1"])
    masker = build_sparsity(config.sparsity, model, "wide_linear", optimizer, total_steps=10**6, seed=0,
                            batch_source=lambda step: (inputs, labels))
    engine = masker.engine

    def update(step: int) -> None:
        if method == "rigl":
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(inputs), labels).backward()  # the hooks show the dense grad to the engine
            engine.after_step(masker, step)
            optimizer.zero_grad(set_to_none=True)
        else:
            engine.after_step(masker, step)

    masker.step = 1
    update(1)  # warm-up
    masker.apply()
    times, peaks = [], []
    for r in range(repeats):
        masker.step = 2 + r
        with PeakRSS() as peak:
            start = time.perf_counter()
            update(masker.step)
            times.append(time.perf_counter() - start)
        peaks.append(peak.mib)
        masker.apply()  # the every-step re-mask (shared by all methods), outside the measurement
    assert int(masker.masks["0.weight"].sum()) == round(density * width * width)
    return {"method": method, "width": width, "seconds": statistics.median(times), "peak_mib": max(peaks),
            "nnz": int(masker.masks["0.weight"].sum())}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--density", type=float, default=0.01)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="a seconds-long run at tiny sizes (a test runs it)")
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "WIDTH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:  # both methods, each in its subprocess, on one 128-wide layer
        args.widths, args.density, args.batch, args.repeats = [128], 0.05, 8, 1
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.density, args.batch, args.repeats)))
        return
    import pandas as pd

    rows = []
    for width in args.widths:
        for method in ("gse", "rigl"):
            out = subprocess.run([sys.executable, __file__, "--child", method, str(width), "--density",
                                  str(args.density), "--batch", str(args.batch), "--repeats", str(args.repeats)],
                                 check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
    frame = pd.DataFrame(rows).pivot(index="width", columns="method", values=["seconds", "peak_mib"])
    table = pd.DataFrame({
        "nnz": pd.DataFrame(rows).groupby("width")["nnz"].first(),
        "GSE ms": frame[("seconds", "gse")] * 1e3, "RigL ms": frame[("seconds", "rigl")] * 1e3,
        "time RigL/GSE": frame[("seconds", "rigl")] / frame[("seconds", "gse")],
        "GSE peak MiB": frame[("peak_mib", "gse")], "RigL peak MiB": frame[("peak_mib", "rigl")],
        "memory RigL/GSE": frame[("peak_mib", "rigl")] / frame[("peak_mib", "gse")].clip(lower=0.1),
    })
    print(f"one topology update, Linear(width, width) at density {args.density}, score batch {args.batch}, "
          f"median of {args.repeats}")
    print(table.round(2).to_markdown() if _has_tabulate() else table.round(2).to_string())


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    main()

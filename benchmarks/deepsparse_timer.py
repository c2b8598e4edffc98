"""Times an ONNX model under DeepSparse; run by ``benchmarks/sparse_inference.py`` with DeepSparse's own python.

DeepSparse 1.8 needs numpy<2 and cannot live beside the toolkit, so this file imports nothing of it: only numpy
and deepsparse. It compiles ``MODEL.onnx`` for the batch in ``IMAGES.npy``, writes the logits to ``LOGITS.npy``
(the caller checks them) and prints ``{"seconds": [...]}``, one entry per timed call, as its last line.

Usage (by hand)::

    VENV/bin/python benchmarks/deepsparse_timer.py model.onnx images.npy logits.npy --threads 1 --repeats 7
"""

import argparse
import json
import time

import numpy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("images")
    parser.add_argument("logits")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    import deepsparse

    images = numpy.ascontiguousarray(numpy.load(args.images).astype(numpy.float32))
    engine = deepsparse.compile_model(args.model, batch_size=images.shape[0], num_cores=args.threads)
    logits = engine([images])[0]
    numpy.save(args.logits, logits)
    seconds = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        engine([images])
        seconds.append(time.perf_counter() - start)
    print(json.dumps({"seconds": seconds}))  # noqa: T201  (the caller reads this line)


if __name__ == "__main__":
    main()

"""Stand-in for Hugging Face ``datasets`` in SGLang's benchmark clients on the offline GPU box.

``sglang.benchmark.datasets`` imports ``datasets.load_dataset`` at module level (for MMMU), so
``sglang.bench_one_batch_server`` / ``bench_serving`` cannot even start without the package,
which (with pyarrow) does not fit the 64 MiB carried to that machine. The ``random-ids`` dataset
we benchmark with never calls it. Put this directory on ``PYTHONPATH`` only for those clients.
"""


def load_dataset(*args, **kwargs):
    raise RuntimeError(
        "the `datasets` package is not installed on this machine (this is the benchmark shim "
        "from scripts/bench_shims); use --dataset-name random-ids"
    )

"""Benchmark and profiling helpers for the GPU runs (pure Python, no CUDA needed to import).

- :mod:`.trace`: parses a torch-profiler chrome trace (SGLang's ``/start_profile``) into per
  decode step statistics: GPU kernels per step, GPU time per step, top kernels by time;
- :mod:`.cells`: the side-by-side benchmark's cells (input length x batch), medians over
  repeats, pool capacity read back from a server;
- :mod:`.table`: merges the per-implementation JSONs into one table with ours / native ratios.

The scripts that drive them are ``scripts/side_by_side.py``, ``scripts/gpu_side_by_side.sh``,
``scripts/perf_table.py`` and ``scripts/profile_decode.py`` (commands in docs/perf.md).
"""

"""Benchmark and profiling helpers for the GPU runs (pure Python, no CUDA needed to import).

- :mod:`.trace`: parses a torch-profiler chrome trace (SGLang's ``/start_profile``) into per
  decode step statistics: GPU kernels per step, GPU time per step, top kernels by time;
- :mod:`.cells`: the side-by-side benchmark's cells (input length x batch), medians over
  repeats, pool capacity read back from a server;
- :mod:`.table`: merges the per-implementation JSONs into one table with ours / native ratios;
- :mod:`.timing`: the kernel benches' timing (CUDA-graph replays, CUDA events, medians per call,
  GB/s, the JSON they write), used by ``scripts/bench_*.py``;
- :mod:`.sm90_compile`: compiles Triton kernels for sm_90 without a GPU and reports registers /
  spills (``scripts/compile_sm90.py`` and ``scripts/compile_<family>_sm90.py``; needs triton);
- :mod:`.host_trace`: a debug plugin (entry point ``dsv4_hosttrace``, inert unless
  ``SGLANG_DSV4_HOST_TRACE`` is set) timing the scheduler loop's phases and the decode graph's
  launch inside a server; :mod:`.host_phases` turns its files into per-step rows
  (``scripts/dgap.py``, ``scripts/gpu_dgap.sh``).

The scripts that drive them are ``scripts/side_by_side.py``, ``scripts/gpu_side_by_side.sh``,
``scripts/perf_table.py`` and ``scripts/profile_decode.py`` (commands in docs/perf.md).
"""

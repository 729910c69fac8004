"""Pure-torch reference ops of DSV4 (CPU-runnable, fp32 math): the statement of the model's math
that every kernel and the serving path are checked against. One function per op; shapes in the
docstrings. Modules: ``norm``, ``rope``, ``compressor``, ``indexer``, ``attention``, ``mhc``,
``moe``, ``quant`` and ``model`` (a whole-model forward composed from them)."""

"""sglang-dsv4: DeepSeek-V4 served by SGLang through its plugin seams.

Layout: ``config`` (config.json -> frozen per-layer schedule), ``ref`` (pure-torch reference ops,
the statement of DSV4's math every kernel is checked against), ``checkpoint`` (tensor names),
``plugin`` (the only module that touches SGLang's registries).
"""

__version__ = "0.1.0"

"""The one weight product of the reference math: ``linear(x, w)``.

Every ``x @ W.T`` of the model goes through here, so a weight may be stored as something other
than a dense tensor: the served model keeps released-format FP8 / NVFP4 linears quantized on the
GPU (:mod:`sglang_dsv4.model.linears`) and hands those modules to the reference in place of the
tensors. A dense tensor keeps the plain product (bit-identical to ``x @ w.T``).
"""

from collections.abc import Callable

import torch

__all__ = ["Weight", "linear"]

Weight = torch.Tensor | Callable[[torch.Tensor], torch.Tensor]
"""A dense ``[N, K]`` tensor, or a quantized linear: ``w(x [..., K]) -> [..., N]``."""


def linear(x: torch.Tensor, w: Weight) -> torch.Tensor:
    """x @ w.T for a dense weight [N, K]; a quantized weight object is called instead — it owns
    its kernel."""
    if isinstance(w, torch.Tensor):
        return x @ w.T
    return w(x)

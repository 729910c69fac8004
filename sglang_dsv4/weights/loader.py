"""Streaming checkpoint loading: checkpoint tensors in, checked logical weights out.

:class:`WeightStream` consumes ``(name, tensor)`` pairs in any order (SGLang's safetensors
iterator goes shard by shard) and hands every logical tensor, as a :class:`StoredWeight`, to a
``deliver(name, stored)`` callback as soon as all of its parts have arrived: a quantized weight
waits only for its ``.scale`` partner, so host memory holds the current shard plus at most a few
unpaired halves, never the model. Names go through the one HF -> released table
(:mod:`sglang_dsv4.weights.names`). MTP tensors (``mtp.*``) are counted and skipped, or, for
the speculative draft model (``mtp=True``), are the ones collected.

Which tensors must be there and how they are stored comes from the config: with a
``quantization_config`` the released layout (:func:`~sglang_dsv4.weights.layout.released_fmt`),
without one dense floating tensors (fp32 / bf16 / fp16). Anything else stops loading with an
error naming the tensor and the expected and found shape / dtype.
"""

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from sglang_dsv4.config import DSV4Config
from sglang_dsv4.progress import progress
from sglang_dsv4.weights.layout import (
    Fmt,
    StoredWeight,
    TensorSpec,
    describe,
    logical_shapes,
    released_fmt,
    stored_specs,
)
from sglang_dsv4.weights.names import hf_to_released, is_hf_name, is_mtp_name, to_released_names

__all__ = [
    "CheckpointError",
    "LoadStats",
    "MissingTensorError",
    "TensorMismatchError",
    "UnexpectedTensorError",
    "WeightStream",
    "checkpoint_files",
    "iter_safetensors",
    "load_state_dict",
]


class CheckpointError(ValueError):
    """The checkpoint does not hold what the config says the model needs."""


class MissingTensorError(CheckpointError):
    pass


class UnexpectedTensorError(CheckpointError):
    pass


class TensorMismatchError(CheckpointError):
    """A tensor has the wrong shape or dtype."""


@dataclass
class LoadStats:
    delivered: int = 0
    skipped: int = 0  # MTP tensors when loading the main model, main ones for the MTP layers
    formats: dict[str, int] = field(default_factory=dict)


@dataclass
class _Expected:
    fmt: Fmt
    parts: dict[str, TensorSpec]  # checkpoint name -> spec (weight first, then its scale)


class WeightStream:
    """``feed`` checkpoint tensors one by one, then ``finish``; see the module docstring.
    ``mtp``: collect the MTP layers' tensors instead (the speculative draft model's), skipping
    the main model's."""

    def __init__(
        self, cfg: DSV4Config, deliver: Callable[[str, StoredWeight], None], mtp: bool = False
    ):
        self.deliver = deliver
        self.stats = LoadStats()
        self.mtp = mtp
        self._expected: dict[str, _Expected] = {}  # logical name -> what to collect
        self._owner: dict[str, str] = {}  # checkpoint name -> logical name
        quant = cfg.quant
        shapes = logical_shapes(cfg, mtp=mtp)
        if mtp:
            shapes = {n: s for n, s in shapes.items() if is_mtp_name(n)}
        for name, shape in shapes.items():
            fmt = released_fmt(name, quant.expert_dtype) if quant else Fmt.DENSE
            parts = stored_specs(name, shape, fmt)
            self._expected[name] = _Expected(fmt, parts)
            self._owner |= dict.fromkeys(parts, name)
        self._pending: dict[str, dict[str, torch.Tensor]] = {}  # logical -> parts received
        self._done: set[str] = set()
        self._format = "released" if quant else "dense"
        # on a terminal: logical tensors delivered (dequantizing a large checkpoint takes a while)
        self._bar = progress(len(self._expected), "DSV4 weights", "tensor")

    def feed(self, name: str, tensor: torch.Tensor) -> None:
        if is_mtp_name(name) != self.mtp:
            self.stats.skipped += 1
            return
        try:
            pairs = list(to_released_names(name, tensor))
        except KeyError:
            raise UnexpectedTensorError(
                f"unexpected tensor `{name}` (no entry in the HF -> DeepSeek name table)"
            ) from None
        for ours, t in pairs:
            self._feed_one(name, ours, t)

    def _feed_one(self, original: str, name: str, t: torch.Tensor) -> None:
        shown = name if original == name else f"{original}` (as `{name}"
        logical = self._owner.get(name)
        if logical is None:
            hint = ""
            if name.endswith(".scale") and self._format == "dense":
                hint = " (a quantized tensor, but config.json has no quantization_config)"
            raise UnexpectedTensorError(f"unexpected tensor `{shown}` in the checkpoint{hint}")
        exp = self._expected[logical]
        spec = exp.parts[name]
        if not spec.matches(t):
            raise TensorMismatchError(
                f"tensor `{shown}`: expected {spec.describe()} ({self._format} format, "
                f"{exp.fmt.value}), found {describe(t)}"
            )
        got = self._pending.setdefault(logical, {})
        if name in got or logical in self._done:
            raise UnexpectedTensorError(f"tensor `{shown}` appears twice in the checkpoint")
        got[name] = t
        if len(got) < len(exp.parts):
            return  # wait for the partner (weight <-> scale)
        del self._pending[logical]
        data, *scale = (got[n] for n in exp.parts)
        self.deliver(logical, StoredWeight(exp.fmt, data, scale[0] if scale else None))
        self._done.add(logical)
        self._bar.update()
        self.stats.delivered += 1
        self.stats.formats[exp.fmt.value] = self.stats.formats.get(exp.fmt.value, 0) + 1

    def finish(self) -> LoadStats:
        self._bar.close()
        missing = [
            part
            for logical, exp in self._expected.items()
            if logical not in self._done
            for part, spec in exp.parts.items()
            if part not in self._pending.get(logical, {})
        ]
        if missing:
            first = missing[0]
            spec = self._expected[self._owner[first]].parts[first]
            more = f", and {len(missing) - 1} more, e.g. {missing[1:4]}" if missing[1:] else ""
            if self.mtp and len(missing) == sum(len(e.parts) for e in self._expected.values()):
                raise MissingTensorError(
                    "the checkpoint has no MTP layer (no `mtp.*` tensors, e.g. "
                    f"`{first}`): speculative decoding drafts with it; serve without "
                    "--speculative-algorithm, or a checkpoint that has one"
                )
            raise MissingTensorError(
                f"tensor `{first}` ({spec.describe()}) is missing from the checkpoint{more}"
            )
        return self.stats

    def run(self, weights: Iterable[tuple[str, torch.Tensor]]) -> LoadStats:
        for name, tensor in weights:
            self.feed(name, tensor)
        return self.finish()


def checkpoint_files(path: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint directory (index order) or the file itself."""
    path = Path(path)
    if path.is_file():
        return [path]
    if (index := path / "model.safetensors.index.json").exists():
        with open(index) as f:
            return [path / s for s in sorted(set(json.load(f)["weight_map"].values()))]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files under {path}")
    return files


def iter_safetensors(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every tensor in a checkpoint, one shard open at a time."""
    for file in checkpoint_files(path):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                yield name, f.get_tensor(name)


def load_state_dict(path: str | Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """All model tensors of a checkpoint under released names, dense (quantized ones are
    dequantized to ``dtype``, default fp32), checked against its config.json when it has one;
    MTP tensors are left out. Without a config.json, tensors are only renamed."""
    path = Path(path)
    config = (path if path.is_dir() else path.parent) / "config.json"
    if not config.exists():
        raw = dict(iter_safetensors(path))
        return hf_to_released(raw) if any(is_hf_name(n) for n in raw) else raw
    out: dict[str, torch.Tensor] = {}

    def keep(name: str, stored: StoredWeight) -> None:
        t = stored.dequant(dtype or torch.float32) if stored.fmt.quantized else stored.data
        out[name] = t.contiguous() if dtype is None or not t.is_floating_point() else t.to(dtype)

    WeightStream(DSV4Config.from_json(config), keep).run(iter_safetensors(path))
    return out

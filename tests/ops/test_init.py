"""``build_ops``: the implementation of every family is chosen once, from the device."""

import dataclasses

import pytest
import torch

from sglang_dsv4.ops import Ops, build_ops
from sglang_dsv4.ops.mhc import HcTorch, HcTriton
from sglang_dsv4.ops.moe import MoeTorch, MoeTriton
from sglang_dsv4.ops.norm import NormTorch, NormTriton
from sglang_dsv4.ops.proj import ProjCat, ProjTorch


def test_cpu_gets_the_twins_and_kernels_can_be_forced(tiny_cfg):
    ops = build_ops(tiny_cfg, "cpu")
    assert (type(ops.hc), type(ops.norm), type(ops.moe)) == (HcTorch, NormTorch, MoeTorch)
    assert type(ops.proj) is ProjTorch
    forced = build_ops(tiny_cfg, torch.device("cpu"), kernels=True)
    assert isinstance(forced.hc, HcTriton) and isinstance(forced.norm, NormTriton)
    assert isinstance(forced.moe, MoeTriton) and isinstance(forced.proj, ProjCat)
    assert forced.hc.tickets.device.type == "cpu" and not forced.hc.tickets.any()


def test_ops_are_frozen(tiny_cfg):
    ops = build_ops(tiny_cfg, "cpu")
    with pytest.raises(dataclasses.FrozenInstanceError):
        ops.hc = None
    assert {f.name for f in dataclasses.fields(Ops)} == {"hc", "norm", "moe", "proj"}


def test_rope_kernels_reject_other_rope_dims(tiny_cfg):
    with pytest.raises(ValueError, match="64 channels"):
        build_ops(tiny_cfg.replace(rope_dim=32), "cpu", kernels=True)
    assert type(build_ops(tiny_cfg.replace(rope_dim=32), "cpu").norm) is NormTorch


@pytest.mark.gpu
def test_cuda_gets_the_kernels(tiny_cfg):
    ops = build_ops(tiny_cfg, "cuda")
    assert isinstance(ops.hc, HcTriton) and isinstance(ops.norm, NormTriton)
    assert isinstance(ops.moe, MoeTriton) and isinstance(ops.proj, ProjCat)
    assert ops.hc.tickets.is_cuda and ops.hc.programs >= 2

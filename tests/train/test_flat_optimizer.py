"""hai_medqa/train/flat_optimizer.py: one flat tensor stepped exactly as the per-tensor optimizer steps each tensor."""

from __future__ import annotations

import io
import types

import pytest
import torch

from hai_medqa.train import backends
from hai_medqa.train.flat_optimizer import FlatOptimizer

# LoRA-like sizes: 8-bit eligible (multiples of 256, >= 4096), one too small for 8-bit states (bitsandbytes keeps
# it in 32 bits; 8 x 64 even though a whole number of blocks), one not a multiple of the 256-element block
SHAPES = [(16, 256), (4097,), (64, 64), (8, 64), (10, 30), (32, 256)]
OPTIMIZERS = ["paged_adamw_8bit", "adamw_8bit", "adamw_torch"]


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g) * 0.02) for s in SHAPES]


def _make(name: str):
    cfg = types.SimpleNamespace(optimizer=name, learning_rate=2e-3, adam_beta1=0.9, adam_beta2=0.999, weight_decay=0.01)
    return lambda tensors: backends.build_optimizer(tensors, cfg, torch.device("cpu"))[0]


def _run(opt, params, steps: range, *, seed: int = 1) -> None:
    for step in steps:  # a learning rate that changes, set as a schedule sets it (on the groups)
        opt.param_groups[0]["lr"] = 2e-3 * (1.0 - 0.1 * step)
        g = torch.Generator().manual_seed(seed * 1000 + step)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g) * (1 + step)
        opt.step()
        opt.zero_grad(set_to_none=True)


def _same_value(a, b, where: tuple) -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a) == sorted(b), (where, a.keys(), getattr(b, "keys", lambda: b)())
        for key in a:
            _same_value(a[key], b[key], (*where, key))
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    else:
        assert a == b, where


def _same_state(a: dict, b: dict) -> None:
    _same_value(a, b, ())


@pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU")
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_flat_steps_equal_per_tensor_steps_bit_for_bit(name):
    """Six steps with a changing learning rate: the same parameters and the same (per-tensor) state dict."""
    ref_params, flat_params = _params(), _params()
    ref, flat = _make(name)(ref_params), FlatOptimizer(flat_params, _make(name))
    assert len(flat.members) >= 3, flat.members  # the eligible tensors really are flattened
    _run(ref, ref_params, range(6))
    _run(flat, flat_params, range(6))
    for a, b in zip(ref_params, flat_params, strict=True):
        assert torch.equal(a, b)
    _same_state(ref.state_dict(), flat.state_dict())


@pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU")
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_checkpoints_move_between_flat_and_per_tensor_optimizers(name):
    """A per-tensor checkpoint resumes into the flat optimizer and the other way round (through torch.save and a
    weights-only load, as checkpoint.py does), and both continue exactly as an uninterrupted run."""
    ref_params = _params()
    ref = _make(name)(ref_params)
    _run(ref, ref_params, range(6))

    def saved(sd: dict) -> dict:
        buf = io.BytesIO()
        torch.save(sd, buf)
        buf.seek(0)
        return torch.load(buf, weights_only=True)

    # per-tensor for 3 steps -> flat for 3
    a_params = _params()
    a = _make(name)(a_params)
    _run(a, a_params, range(3))
    a_sd = saved(a.state_dict())
    a2 = FlatOptimizer(a_params, _make(name))
    a2.load_state_dict(a_sd)
    _run(a2, a_params, range(3, 6))
    # flat for 3 steps -> per-tensor for 3
    b_params = _params()
    b = FlatOptimizer(b_params, _make(name))
    _run(b, b_params, range(3))
    b2 = _make(name)(b_params)
    b2.load_state_dict(saved(b.state_dict()))
    _run(b2, b_params, range(3, 6))
    for r, x, y in zip(ref_params, a_params, b_params, strict=True):
        assert torch.equal(r, x) and torch.equal(r, y)


def test_a_state_dict_for_other_tensors_is_refused_in_one_line():
    params = _params()
    opt = FlatOptimizer(params, _make("adamw_torch"))
    other = _make("adamw_torch")(params[:2])
    with pytest.raises(ValueError, match="optimizer state for 2 tensors"):
        opt.load_state_dict(other.state_dict())


@pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU")
def test_parameters_written_after_the_optimizer_was_made_are_the_ones_stepped():
    """A resume loads the adapter into the model; were that after the optimizer was built, a flat copy taken once
    would step the old values and write them back over the loaded ones."""
    ref_params, flat_params = _params(), _params()
    ref, flat = _make("paged_adamw_8bit")(ref_params), FlatOptimizer(flat_params, _make("paged_adamw_8bit"))
    with torch.no_grad():
        for p in ref_params + flat_params:
            p.mul_(3.0)
    _run(ref, ref_params, range(2))
    _run(flat, flat_params, range(2))
    for a, b in zip(ref_params, flat_params, strict=True):
        assert torch.equal(a, b)

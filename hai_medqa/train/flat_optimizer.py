"""One flat parameter for the optimizer: the same update as per-tensor AdamW, in one launch instead of 448.

bitsandbytes' 8-bit optimizers launch one update kernel per parameter and then call
`torch.cuda.synchronize()` after each (bitsandbytes 0.50 `Optimizer8bit.step`). LoRA on the seven
projections of 32 layers has 448 parameters, so the 7.8B's `fast` step spent ~33 ms of its ~550 with the
GPU idle while the host stepped the optimizer (H200, `bench/kernel_breakdown.py`'s idle analysis;
docs/performance.md). `FlatOptimizer` gives the optimizer one fp32 master copy of the parameters,
concatenated, and steps that:

    values and grads of the 448 tensors --copy--> flat tensor -> optimizer step on it -> copy back

The update is bit for bit the per-tensor one: AdamW is element-wise, and bitsandbytes' blockwise 8-bit
states quantise blocks of 256 elements, so a tensor joins the flat copy only where its blocks stay its
own (a multiple of 256 elements, and at least `min_8bit_size`, below which bitsandbytes keeps 32-bit
states). Other tensors are stepped on their own as before. `state_dict()` is written per tensor,
exactly as the per-tensor optimizer writes it, and `load_state_dict()` reads that format, so checkpoints
move between this and the plain optimizer in both directions.

Costs: the fp32 master copy (4 bytes per trainable parameter: 160 MiB for the 7.8B's 41.9M LoRA parameters) and, during
`step()`, the flat gradient (the same again). FSDP runs keep the per-tensor optimizer (model_build.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

BNB_BLOCK = 256
"""Elements per quantisation block of bitsandbytes' blockwise 8-bit optimizer states."""


def _is_bnb(optimizer: torch.optim.Optimizer) -> bool:
    return type(optimizer).__module__.startswith("bitsandbytes")


def flattenable(p: torch.Tensor, optimizer: torch.optim.Optimizer) -> bool:
    """Whether `p` can share the flat tensor without changing its update under `optimizer`.

    >>> import torch
    >>> opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    >>> flattenable(torch.zeros(3), opt)   # element-wise: any size
    True
    """
    if p.dtype != torch.float32:
        return False
    if not _is_bnb(optimizer):
        return isinstance(optimizer, torch.optim.AdamW)
    args = optimizer.args
    if getattr(args, "percentile_clipping", 100) < 100 or getattr(args, "max_unorm", 0.0) > 0:
        return False  # per-tensor gradient statistics: flattening would pool them
    if args.optim_bits == 8:
        return p.numel() % BNB_BLOCK == 0 and p.numel() >= args.min_8bit_size
    return True


class FlatOptimizer:
    """Steps `params` through `make(list_of_tensors)` with the flattenable ones as one tensor.

    Quacks as the optimizer the trainer, the checkpoint code and the learning-rate schedule need:
    `step`, `zero_grad`, `state_dict`, `load_state_dict`, `param_groups`, `state`; build the schedule
    on `.inner` (torch's schedules want a real `torch.optim.Optimizer`).
    """

    def __init__(self, params: list[torch.nn.Parameter], make: Callable[[list[torch.Tensor]], torch.optim.Optimizer]):
        self.params = list(params)
        probe = make([torch.nn.Parameter(torch.zeros(1, device=self.params[0].device))]) if self.params else None
        members = [i for i, p in enumerate(self.params) if probe is not None and flattenable(p, probe)]
        self.members = members if len(members) > 1 else []  # one tensor alone gains nothing
        self.loners = sorted(set(range(len(self.params))) - set(self.members))
        self.offsets: list[int] = []
        total = 0
        for i in self.members:
            self.offsets.append(total)
            total += self.params[i].numel()
        self.flat: torch.nn.Parameter | None = None
        if self.members:
            with torch.no_grad():
                self.flat = torch.nn.Parameter(torch.cat([self.params[i].detach().reshape(-1) for i in self.members]))
            # views of the flat copy, one per member, made once
            self._views = [self.flat.detach()[o:o + self.params[i].numel()].view_as(self.params[i])
                           for i, o in zip(self.members, self.offsets, strict=True)]
        self.inner = make(([self.flat] if self.flat is not None else []) + [self.params[i] for i in self.loners])

    # ---------------------------------------------------------------- what the trainer calls
    @property
    def param_groups(self) -> list[dict]:
        return self.inner.param_groups

    @property
    def state(self) -> Any:
        return self.inner.state

    def __getattr__(self, name: str) -> Any:  # e.g. page_mng, is_paged (backends.repage_loaded_optimizer_state)
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    @torch.no_grad()
    def step(self) -> None:
        """Gather values and gradients into the flat tensor, step, write the new values back.

        The values are gathered too (one more 160 MiB copy on the GPU at 7.8B) so the flat copy is never stale: whatever
        wrote the parameters since the last step (an adapter loaded into the model) is what gets stepped."""
        if self.flat is not None:
            torch._foreach_copy_(self._views, [self.params[i].data for i in self.members])
            grads = [self.params[i].grad for i in self.members]
            if any(g is None for g in grads):  # stepped as a zero gradient (the project's LoRA always has one)
                grads = [torch.zeros_like(self.params[i]) if g is None else g for i, g in zip(self.members, grads, strict=True)]
            self.flat.grad = torch.cat([g.reshape(-1) for g in grads])
        self.inner.step()
        if self.flat is not None:
            self.flat.grad = None
            torch._foreach_copy_([self.params[i].data for i in self.members], self._views)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    # ---------------------------------------------------------------- checkpoints: the per-tensor format
    @property
    def _loner_offset(self) -> int:
        """Index of the first loner among the inner optimizer's tensors (the flat tensor comes first)."""
        return 0 if self.flat is None else 1

    def _member_part(self, value: Any, k: int, p: torch.Tensor, key: str = "") -> Any:
        """The part of a flat state value that belongs to member k (parameter p); nested dicts (bitsandbytes
        keeps its quantised states in one) part by part."""
        if isinstance(value, dict):
            return {key2: self._member_part(v, k, p, key2) for key2, v in value.items()}
        if not isinstance(value, torch.Tensor):
            return value
        o, n = self.offsets[k], p.numel()
        if key.startswith("absmax"):  # one scale per block of the flat tensor: blocks are the member's own
            return value[o // BNB_BLOCK:(o + n) // BNB_BLOCK].clone()
        if value.numel() != self.flat.numel():  # step counts, quantisation maps: shared
            return value.clone()
        return value.reshape(-1)[o:o + n].view_as(p).clone()

    def _merge(self, values: list[Any], key: str = "") -> Any:
        """The flat state value made of the members' values (the inverse of `_member_part`)."""
        first = values[0]
        if isinstance(first, dict):
            return {key2: self._merge([v[key2] for v in values], key2) for key2 in first}
        per_element = isinstance(first, torch.Tensor) and not key.startswith("qmap") and all(
            v.numel() == self.params[i].numel() for v, i in zip(values, self.members, strict=True))
        if key.startswith("absmax") or per_element:
            return torch.cat([v.reshape(-1) for v in values])
        return first  # step counts, quantisation maps: shared

    def state_dict(self) -> dict:
        """The per-tensor optimizer's state dict: {'state': {index: {...}}, 'param_groups': [...]}.

        >>> import torch
        >>> ps = [torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))]
        >>> for p in ps: p.grad = torch.ones_like(p)
        >>> opt = FlatOptimizer(ps, lambda t: torch.optim.AdamW(t, lr=0.1))
        >>> opt.step(); sorted(opt.state_dict()["state"]), opt.state_dict()["state"][1]["exp_avg"].shape
        ([0, 1], torch.Size([3]))
        """
        inner = self.inner.state_dict()
        if len(inner["param_groups"]) != 1:
            raise ValueError("FlatOptimizer supports one parameter group")
        state: dict[int, dict] = {}
        if self.flat is not None and 0 in inner["state"]:
            flat_state = inner["state"][0]
            for k, i in enumerate(self.members):
                state[i] = self._member_part(flat_state, k, self.params[i])
        for j, i in enumerate(self.loners):
            if j + self._loner_offset in inner["state"]:
                state[i] = inner["state"][j + self._loner_offset]
        group = {k: v for k, v in inner["param_groups"][0].items() if k != "params"}
        return {"state": dict(sorted(state.items())), "param_groups": [{**group, "params": list(range(len(self.params)))}]}

    def load_state_dict(self, sd: dict) -> None:
        """Load a per-tensor state dict (this class's or the plain optimizer's)."""
        if len(sd["param_groups"]) != 1 or len(sd["param_groups"][0]["params"]) != len(self.params):
            raise ValueError(f"optimizer state for {sum(len(g['params']) for g in sd['param_groups'])} tensors in "
                             f"{len(sd['param_groups'])} group(s); this run trains {len(self.params)} in one")
        ids = sd["param_groups"][0]["params"]
        per = {pos: sd["state"][pid] for pos, pid in enumerate(ids) if pid in sd["state"]}
        state: dict[int, dict] = {}
        if self.flat is not None:
            have = [i in per for i in self.members]
            if any(have) and not all(have):
                raise ValueError("optimizer state covers only some of the trained tensors")
            if all(have):
                state[0] = self._merge([per[i] for i in self.members])
        for j, i in enumerate(self.loners):
            if i in per:
                state[j + self._loner_offset] = per[i]
        n_inner = self._loner_offset + len(self.loners)
        group = {**sd["param_groups"][0], "params": list(range(n_inner))}
        self.inner.load_state_dict({"state": state, "param_groups": [group]})
        if self.flat is not None and getattr(self.inner, "is_paged", False) and self.flat.is_cuda and self.flat.numel() >= 1e5:
            st = self.inner.state.get(self.flat, {})
            for key in ("state1", "state2"):  # marked as bitsandbytes pages a fresh state of this size;
                if isinstance(st.get(key), torch.Tensor):  # backends.repage_loaded_optimizer_state moves them
                    st[key].is_paged = True

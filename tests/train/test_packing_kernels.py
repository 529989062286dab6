"""Packing is exact for the kernels the training profiles actually use, on the device at hand.

tests/test_packing.py proves the packing convention on the tiny model; this file repeats the proof with
each profile's full set of kernels - attention implementation, the fused LoRA forward, fixed-length
filler and (on a GPU) Liger's RoPE/RMSNorm/SwiGLU and fused linear+cross-entropy. On the CPU it checks
sdpa (the plain profile) and flex attention (CPU flex compiles slowly: opt in with HAI_TEST_FLEX_CPU=1);
on a CUDA machine (`pytest tests/test_packing_kernels.py` on the GPU box, as recorded in
docs/performance.md) it checks the exact GPU kernels of the lean and fast profiles, in bf16 as they train
(flex attention's fp32 GPU kernel never finished compiling at this shape on the H100).

Three checks per kernel set: changing one sample's tokens leaves the later samples' logits unchanged
(exact in any dtype, since masked scores contribute exactly zero); each sample's logits and loss in the
packed row equal those of the sample run alone (1e-5 in fp32; bf16 rounding on the GPU); and the same
row without position-id restarts differs far more than that rounding (so the check can fail).
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch

from hai_medqa.train.fast_lora import fuse_lora_forward
from hai_medqa.train.packing import collate_packed
from hai_medqa.train.sft_data import IGNORE_INDEX, TokenizedDataset

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32  # the dtype each device trains in
LOGIT_TOL, LOSS_RTOL = (0.1, 2e-2) if CUDA else (1e-4, 1e-5)
LENGTHS = [37, 80, 13, 55]
PROMPT = 9  # first tokens of each sample carry no loss, as in SFT
FIXED = 256  # row padded to a fixed length with inert filler, as the fast profile does


def _kernels():
    yield pytest.param("sdpa", False, id="sdpa")
    flex_ok = CUDA or os.environ.get("HAI_TEST_FLEX_CPU") == "1"
    yield pytest.param("flex_attention", False, id="flex",
                       marks=pytest.mark.skipif(not flex_ok, reason="CPU flex compile is slow; HAI_TEST_FLEX_CPU=1"))
    has_liger = CUDA and importlib.util.find_spec("liger_kernel") is not None
    for attn in ("sdpa", "flex_attention"):
        yield pytest.param(attn, True, id=f"{attn}+liger",
                           marks=pytest.mark.skipif(not has_liger, reason="Liger kernels need CUDA + liger-kernel"))


@pytest.fixture(scope="module")
def dataset() -> TokenizedDataset:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 500, (sum(LENGTHS),), generator=gen).numpy().astype(np.int32)
    return TokenizedDataset(input_ids=ids, offsets=np.cumsum([0, *LENGTHS]).astype(np.int64),
                            prompt_lengths=np.full(len(LENGTHS), PROMPT, dtype=np.int64),
                            source_lines=np.arange(1, len(LENGTHS) + 1))


def _model(attn: str, liger: bool):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=128, vocab_size=512, rope_theta=1e6,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    model = LlamaForCausalLM(cfg).to(DEVICE, DTYPE)
    model.set_attn_implementation(attn)
    if liger:
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=True, model=model)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, init_lora_weights=False,
                                              target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                              "up_proj", "down_proj"]))
    fuse_lora_forward(model)
    return model.train()  # training mode, as in the trainer (dropout is 0)


@pytest.mark.parametrize(("attn", "liger"), list(_kernels()))
def test_profile_kernels_keep_packed_samples_apart(dataset, attn, liger):
    torch.backends.cuda.matmul.allow_tf32 = False  # compare fp32 with fp32
    model = _model(attn, liger)
    row = {k: v.to(DEVICE) for k, v in collate_packed(dataset, range(len(LENGTHS)), pad_to=FIXED).items()}
    assert row["input_ids"].shape[1] == FIXED
    with torch.no_grad():
        packed = model(input_ids=row["input_ids"], position_ids=row["position_ids"], use_cache=False).logits[0]
        # Summed loss through the model's own loss path (Liger's fused linear+CE when applied).
        n_items = torch.tensor(float((row["labels"] != IGNORE_INDEX).sum()), device=DEVICE)
        packed_loss_sum = model(**row, use_cache=False, num_items_in_batch=n_items).loss * n_items
        alone_sum, off, worst = 0.0, 0, 0.0
        for i, n in enumerate(LENGTHS):
            ids = torch.from_numpy(dataset.sample(i)[0].astype(np.int64))[None].to(DEVICE)
            alone = model(input_ids=ids, use_cache=False).logits[0]
            diff = (packed[off:off + n] - alone).abs().max().item()
            worst = max(worst, diff)
            assert diff < LOGIT_TOL, f"sample {i}: packed logits differ from alone by {diff:.2e} ({attn}, liger={liger})"
            labels = torch.from_numpy(dataset.labels(i)).to(DEVICE)
            loss_alone = torch.nn.functional.cross_entropy(alone[:-1].float(), labels[1:], reduction="sum")
            loss_packed = torch.nn.functional.cross_entropy(packed[off:off + n - 1].float(), labels[1:], reduction="sum")
            assert abs(loss_packed.item() - loss_alone.item()) <= LOSS_RTOL * max(1.0, loss_alone.item())
            alone_sum += loss_alone.item()
            off += n
        # The same row without the position-id restarts is one long causal sequence: contaminated.
        unpacked = model(input_ids=row["input_ids"], use_cache=False).logits[0]
        contaminated = (unpacked[LENGTHS[0]:sum(LENGTHS[:2])] - packed[LENGTHS[0]:sum(LENGTHS[:2])]).abs().max().item()
        # Perturb sample 0: the later samples must not notice (no attention crosses the boundary).
        changed = row["input_ids"].clone()
        changed[0, :LENGTHS[0]] = torch.randint(5, 500, (LENGTHS[0],), generator=torch.Generator().manual_seed(1)).to(DEVICE)
        after = model(input_ids=changed, position_ids=row["position_ids"], use_cache=False).logits[0]
    span = slice(LENGTHS[0], sum(LENGTHS))
    assert (after[:LENGTHS[0]] - packed[:LENGTHS[0]]).abs().max() > 1e-3  # sample 0 did change
    assert (after[span] - packed[span]).abs().max().item() <= 1e-6, "a later sample saw the perturbed one"
    # Without the position-id restarts the samples do see each other, far beyond the rounding allowed.
    assert contaminated > max(10 * worst, 1e-3), f"cannot tell packed from unpacked ({contaminated:.2e} vs {worst:.2e})"
    assert abs(packed_loss_sum.item() - alone_sum) <= 10 * LOSS_RTOL * alone_sum

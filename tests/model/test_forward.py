"""The Llama model built by conversion computes what EXAONE-3.5 computes.

`reference_forward` is an independent EXAONE forward in plain torch (RMSNorm, rotate-half RoPE with
llama3 frequency scaling, GQA attention, SiLU-gated MLP) that reads the EXAONE-named tensors and
the EXAONE config.json directly - no transformers, no project code.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open

from hai_medqa.model.load import load_causal_lm, load_tokenizer


def _load_exaone(folder):
    cfg = json.loads((folder / "config.json").read_text())
    weights = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            for k in f.keys():  # noqa: SIM118 - safe_open is not a dict
                weights[k] = f.get_tensor(k).float()
    return cfg, weights


def _inv_freq(cfg, head_dim):
    inv = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    sc = cfg.get("rope_scaling")
    if not sc:
        return inv
    assert sc["rope_type"] == "llama3"
    factor, low, high = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
    old_len = sc["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    out = []
    for f, wl in zip(inv.tolist(), wavelen.tolist(), strict=True):
        if wl < old_len / high:  # high frequency: unchanged
            out.append(f)
        elif wl > old_len / low:  # low frequency: slowed down by `factor`
            out.append(f / factor)
        else:  # in between: interpolate
            smooth = (old_len / wl - low) / (high - low)
            out.append((1 - smooth) * f / factor + smooth * f)
    return torch.tensor(out, dtype=torch.float64)


def reference_forward(folder, ids: torch.Tensor) -> torch.Tensor:
    """Logits [T, vocab] of EXAONE-3.5 for one sequence, from the EXAONE checkpoint itself."""
    cfg, w = _load_exaone(folder)
    hidden, n_heads, n_kv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or hidden // n_heads
    eps = cfg["layer_norm_epsilon"]
    T = ids.shape[0]

    def rms(x, weight):
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    ang = torch.outer(torch.arange(T, dtype=torch.float64), _inv_freq(cfg, hd))
    cos, sin = torch.cat([ang.cos()] * 2, -1).float(), torch.cat([ang.sin()] * 2, -1).float()

    def rope(x):  # x: [T, heads, hd]; rotate-half convention
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        rotated = torch.cat([-x2, x1], -1)
        return x * cos[:, None] + rotated * sin[:, None]

    x = w["transformer.wte.weight"][ids]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(cfg["num_layers"]):
        p = f"transformer.h.{i}."
        h = rms(x, w[p + "ln_1.weight"])
        q = rope((h @ w[p + "attn.attention.q_proj.weight"].T).view(T, n_heads, hd))
        k = rope((h @ w[p + "attn.attention.k_proj.weight"].T).view(T, n_kv, hd))
        v = (h @ w[p + "attn.attention.v_proj.weight"].T).view(T, n_kv, hd)
        k, v = k.repeat_interleave(n_heads // n_kv, 1), v.repeat_interleave(n_heads // n_kv, 1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd)
        attn = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        out = torch.einsum("hqk,khd->qhd", attn, v).reshape(T, n_heads * hd)
        x = x + out @ w[p + "attn.attention.out_proj.weight"].T
        h = rms(x, w[p + "ln_2.weight"])
        gate = torch.nn.functional.silu(h @ w[p + "mlp.c_fc_0.weight"].T)
        x = x + (gate * (h @ w[p + "mlp.c_fc_1.weight"].T)) @ w[p + "mlp.c_proj.weight"].T
    x = rms(x, w["transformer.ln_f.weight"])
    head = w.get("lm_head.weight", w["transformer.wte.weight"])
    return x @ head.T


def _ids(folder, n_tokens=40):
    tok = load_tokenizer(folder)
    text = "[|system|][|endofturn|]\n[|user|]두통이 자주 생기는데 어떤 검사를 받아야 하나요? 밤에 더 심해요.\n[|assistant|]"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) >= n_tokens // 2
    return torch.tensor(ids[:n_tokens])


@pytest.mark.parametrize("variant", ["untied", "tied"])
def test_converted_llama_matches_reference_forward(variant, tiny_exaone_dir, tiny_exaone_tied_dir):
    folder = tiny_exaone_dir if variant == "untied" else tiny_exaone_tied_dir
    ids = _ids(folder)
    ref = reference_forward(folder, ids)
    model = load_causal_lm(folder, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        got = model(input_ids=ids[None]).logits[0]
    assert got.shape == ref.shape
    # Logits are O(1) here (large init std), so 1e-4 is float32 round-off, not slack.
    assert ref.abs().max() > 0.5
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_unusual_shape_matches_reference(tmp_path):
    """head_dim != hidden/heads, a single KV head, tied embeddings, no rope scaling, bf16 storage:
    every value comes from config.json, none is assumed."""
    from hai_medqa.fixtures.tiny_model import build_exaone_checkpoint

    shape = {"hidden_size": 96, "num_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 1,
             "head_dim": 32, "intermediate_size": 160, "vocab_size": 300, "tie_word_embeddings": True,
             "rope_scaling": None, "rope_theta": 500.0, "layer_norm_epsilon": 1e-6, "torch_dtype": "bfloat16"}
    folder = build_exaone_checkpoint(tmp_path / "odd", shape, max_shard_bytes=40_000, init_std=0.125)
    ids = torch.arange(3, 40) % 300
    ref = reference_forward(folder, ids)
    model = load_causal_lm(folder, dtype=torch.float32, attn_implementation="eager").eval()
    assert model.config.head_dim == 32 and model.config.rope_parameters["rope_theta"] == 500.0
    with torch.no_grad():
        got = model(input_ids=ids[None]).logits[0]
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_dropping_rope_settings_would_change_logits(tiny_exaone_dir):
    """The converted config must carry llama3 scaling and rope_theta: without them logits move far
    beyond the tolerance used above (so the test above can fail on a lossy config mapping)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from hai_medqa.model.convert import ensure_llama_checkpoint

    llama_dir = ensure_llama_checkpoint(tiny_exaone_dir)
    ids = _ids(tiny_exaone_dir)
    ref = reference_forward(tiny_exaone_dir, ids)
    cfg = AutoConfig.from_pretrained(llama_dir)
    assert cfg.rope_parameters["rope_type"] == "llama3"
    theta = cfg.rope_parameters["rope_theta"]
    for lossy in ({"rope_type": "default", "rope_theta": theta}, {**cfg.rope_parameters, "rope_theta": 10000.0}):
        cfg.rope_parameters = lossy
        model = AutoModelForCausalLM.from_pretrained(llama_dir, config=cfg, dtype=torch.float32,
                                                     attn_implementation="eager").eval()
        with torch.no_grad():
            got = model(input_ids=ids[None]).logits[0]
        assert (got - ref).abs().max() > 1e-2, f"rope settings {lossy} made no visible difference"


def test_sdpa_and_4bit_load_run(tiny_exaone_dir):
    """The default attention (SDPA) matches too, and an NF4 4-bit load (QLoRA path) runs on CPU with
    Linear4bit layers and stays close to the full-precision logits."""
    import bitsandbytes as bnb

    ids = _ids(tiny_exaone_dir)
    ref = reference_forward(tiny_exaone_dir, ids)
    sdpa = load_causal_lm(tiny_exaone_dir, dtype=torch.float32).eval()
    q4 = load_causal_lm(tiny_exaone_dir, quantize_4bit=True, dtype=torch.float32).eval()
    assert isinstance(q4.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    with torch.no_grad():
        torch.testing.assert_close(sdpa(input_ids=ids[None]).logits[0], ref, atol=1e-4, rtol=1e-4)
        out4 = q4(input_ids=ids[None]).logits[0]
    assert torch.isfinite(out4).all()
    # NF4 rounding perturbs logits but keeps them strongly correlated with the exact ones.
    corr = torch.corrcoef(torch.stack([out4.flatten(), ref.flatten()]))[0, 1]
    assert corr > 0.9, corr


def test_verify_command_compares_against_reference_logits(tiny_exaone_dir, tmp_path, capsys):
    """`verify --stage converted` with reference logits saved by the original model: here the
    independent reference forward stands in for EXAONE's remote code, which cannot run offline."""
    from hai_medqa.model import verify

    tok = load_tokenizer(tiny_exaone_dir)
    inputs = verify.build_inputs(tok, ["두통이 있어요", "열이 나요"])
    ref_logits = [reference_forward(tiny_exaone_dir, ids[0]) for ids in inputs]
    good = tmp_path / "ref.pt"
    torch.save({"input_ids": inputs, "logits": ref_logits}, good)
    args = ["--model", str(tiny_exaone_dir), "--stage", "converted", "--logits-file", str(good), "--device", "cpu"]
    assert verify.main(args) == 0
    out = capsys.readouterr().out
    assert "overall max |logit diff|" in out and "OK" in out

    bad = tmp_path / "bad.pt"
    torch.save({"input_ids": inputs, "logits": [t + 0.01 * (t > 0) for t in ref_logits]}, bad)
    assert verify.main([*args[:-3], str(bad), "--device", "cpu"]) == 1
    assert "MISMATCH" in capsys.readouterr().out

    assert verify.main(["--model", str(tiny_exaone_dir)]) == 2  # original needs explicit remote-code consent
    assert capsys.readouterr().err.startswith("error: loading the original EXAONE model runs its Hub code")

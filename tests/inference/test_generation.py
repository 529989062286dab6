"""Generation on the tiny EXAONE stand-in: left-padded batches equal one-by-one greedy decoding, stop
at [|endofturn|], base + adapter loading, 4-bit loading."""

from __future__ import annotations

import copy

import pytest
import torch

from hai_medqa import chat_format
from hai_medqa.inference.generation import (
    GenerationSettings,
    InferenceError,
    LoadedModel,
    chat_token_ids,
    generate,
    generate_ids,
    load_for_inference,
)

QUESTIONS = [
    "두통",
    "감기에 걸렸을 때 항생제를 먹어야 하나요?",
    "고혈압 환자는 식이 조절을 어떻게 해야 하나요? 염분 섭취를 줄이면 도움이 되나요?",
    "당뇨병의 초기 증상은 갈증, 잦은 소변, 체중 감소 등이 있다고 들었습니다. 그 밖에 어떤 증상이 있고 "
    "어떤 검사를 받아야 하나요? 자세히 알려주세요.",
]


def _prompts() -> list[str]:
    return [chat_format.render([{"role": "user", "content": q}], add_generation_prompt=True) for q in QUESTIONS]


@pytest.fixture(scope="module")
def tiny_lm(tiny_exaone_dir) -> LoadedModel:
    return load_for_inference(str(tiny_exaone_dir), dtype="float32", device="cpu")


def test_batched_left_padding_equals_one_by_one(tiny_lm):
    prompts = _prompts()
    lengths = [len(tiny_lm.tokenizer(p, add_special_tokens=False).input_ids) for p in prompts]
    assert len(set(lengths)) == len(lengths), "prompts must differ in length so padding is exercised"
    settings = GenerationSettings(max_new_tokens=10)
    batched = generate_ids(tiny_lm, prompts, settings, batch_size=len(prompts))
    single = [generate_ids(tiny_lm, [p], settings, batch_size=1)[0] for p in prompts]
    assert batched == single
    assert all(len(ids) == 10 for ids in single)  # the random model never stops early here

    # The comparison can fail: right padding (pads between prompt and answer) or a mask that lets
    # the model attend to padding both change the outputs of the shorter prompts.
    tok = tiny_lm.tokenizer
    gen_config = settings.generation_config(tok)
    tok.padding_side = "right"
    try:
        enc = tok(prompts, add_special_tokens=False, padding=True, return_tensors="pt")
        right = tiny_lm.model.generate(**enc, generation_config=gen_config)[:, enc["input_ids"].shape[1]:].tolist()
    finally:
        tok.padding_side = "left"
    enc = tok(prompts, add_special_tokens=False, padding=True, return_tensors="pt")
    no_mask = tiny_lm.model.generate(input_ids=enc["input_ids"], attention_mask=torch.ones_like(enc["attention_mask"]),
                                     generation_config=gen_config)[:, enc["input_ids"].shape[1]:].tolist()
    assert right != single
    assert no_mask != single


def test_generation_stops_at_endofturn_per_row(tiny_exaone_dir, tiny_lm):
    tok = tiny_lm.tokenizer
    eot = tok.convert_tokens_to_ids(chat_format.EOT)
    cfg = GenerationSettings().generation_config(tok)
    assert cfg.eos_token_id == eot and cfg.pad_token_id == tok.pad_token_id != eot
    assert cfg.do_sample is False and cfg.use_cache is True

    # Make [|endofturn|] the argmax wherever one frequent token would be: copy its output row, scaled.
    prompts = _prompts()
    first = generate_ids(tiny_lm, prompts, GenerationSettings(max_new_tokens=10), batch_size=4)
    target = max({t for ids in first for t in ids}, key=lambda t: sum(ids.count(t) for ids in first))
    model = copy.deepcopy(tiny_lm.model)
    with torch.no_grad():
        model.lm_head.weight[eot] = model.lm_head.weight[target] * 2.0
    lm = LoadedModel(model, tok, {})
    settings = GenerationSettings(max_new_tokens=10)
    batched = generate_ids(lm, prompts, settings, batch_size=4)
    single = [generate_ids(lm, [p], settings, batch_size=1)[0] for p in prompts]
    assert batched == single
    stopped = [ids for ids in batched if ids and ids[-1] == eot]
    assert stopped, "at least one row must end with [|endofturn|]"
    assert all(eot not in ids[:-1] for ids in batched)  # nothing is generated after EOS
    assert len({len(ids) for ids in batched}) > 1  # rows finished at different steps
    texts = generate(lm, prompts, settings, batch_size=4)
    assert all(chat_format.EOT not in t for t in texts)


def test_settings_are_checked_and_sampling_is_seeded(tiny_lm):
    with pytest.raises(InferenceError, match="temperature"):
        GenerationSettings(temperature=-1)
    with pytest.raises(InferenceError, match="top_p"):
        GenerationSettings(top_p=0)
    with pytest.raises(InferenceError, match="max_new_tokens"):
        GenerationSettings(max_new_tokens=0)
    sampled = GenerationSettings(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=3)
    assert sampled.to_dict()["do_sample"] is True
    prompts = _prompts()[:2]
    assert generate_ids(tiny_lm, prompts, sampled) == generate_ids(tiny_lm, prompts, sampled)


def test_base_plus_adapter(tiny_lora_run, tiny_lm, tiny_exaone_dir):
    prompts = _prompts()[1:]
    settings = GenerationSettings(max_new_tokens=6)
    with_adapter = load_for_inference(str(tiny_exaone_dir), str(tiny_lora_run), dtype="float32", device="cpu")
    assert with_adapter.info["adapter"].endswith("adapter_best")  # a run folder resolves to adapter_best/
    adapted = generate_ids(with_adapter, prompts, settings, batch_size=3)
    assert adapted != generate_ids(tiny_lm, prompts, settings, batch_size=3)  # the adapter changes outputs
    assert adapted == [generate_ids(with_adapter, [p], settings)[0] for p in prompts]
    # the same adapter applied by hand with peft gives the same tokens
    from peft import PeftModel

    by_hand = PeftModel.from_pretrained(copy.deepcopy(tiny_lm.model), str(tiny_lora_run / "adapter_best")).eval()
    assert generate_ids(LoadedModel(by_hand, tiny_lm.tokenizer, {}), prompts, settings, batch_size=3) == adapted
    # without --model the base recorded in adapter_config.json is used
    alone = load_for_inference(None, str(tiny_lora_run / "adapter_best"), dtype="float32", device="cpu")
    assert generate_ids(alone, prompts[:1], settings) == adapted[:1]


def test_the_tokenizer_rule_is_chat_formats(tiny_lm):
    """Inference applies chat_format.apply_tokenizer_rule: padding with [|endofturn|] is refused,
    naming where the tokenizer came from (it used to be a warning and a silent fallback)."""
    assert tiny_lm.token_ids == chat_format.apply_tokenizer_rule(tiny_lm.tokenizer, source="x", repair_template=False)
    tok = copy.deepcopy(tiny_lm.tokenizer)
    tok.pad_token = chat_format.EOT
    with pytest.raises(chat_format.ChatFormatError, match="pad token must exist and differ"):
        LoadedModel(tiny_lm.model, tok, {})
    with pytest.raises(chat_format.ChatFormatError, match="tokenizer from /some/model"):
        chat_token_ids(tok, source="/some/model")


def test_load_4bit_on_cpu(tiny_exaone_dir):
    lm = load_for_inference(str(tiny_exaone_dir), quantize_4bit=True, dtype="float32", device="cpu")
    assert lm.info["quantize_4bit"] is True
    assert "Linear4bit" in type(lm.model.model.layers[0].self_attn.q_proj).__name__
    out = generate_ids(lm, _prompts()[:2], GenerationSettings(max_new_tokens=4), batch_size=2)
    assert [len(x) for x in out] == [4, 4]


def test_missing_model_and_adapter_errors(tmp_path):
    from hai_medqa.merge.lora import AdapterError
    from hai_medqa.model.exaone_layout import ModelLayoutError

    with pytest.raises(InferenceError, match="--model"):
        load_for_inference(None, None)
    with pytest.raises(ModelLayoutError, match="no such local folder"):
        load_for_inference(str(tmp_path / "nope"))
    with pytest.raises(AdapterError, match="does not exist"):
        load_for_inference(str(tmp_path), str(tmp_path / "no_adapter"))

"""Config loading: YAML + CLI overrides, types, unknown keys, profiles, and the shipped configs."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hai_medqa.config import ConfigError, load_config, parse_cli_overrides, save_config
from hai_medqa.train.config import LORA_TARGET_MODULES, PROFILES, TrainConfig, resolve_profile, settle_config


def write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def test_parse_cli_overrides_forms():
    got = parse_cli_overrides(["--lora-r", "8", "--resume", "--learning_rate=1e-4", "--val-file", "null",
                               "--profile", "fast"])
    assert got == {"lora_r": "8", "resume": "true", "learning_rate": "1e-4", "val_file": "null", "profile": "fast"}
    with pytest.raises(ConfigError, match="unexpected command-line argument 'oops'"):
        parse_cli_overrides(["oops"])


def test_yaml_then_cli_precedence_and_types(tmp_path):
    cfg_file = write(tmp_path, "lora_r: 32\nlearning_rate: 2e-4\nmax_steps: 10\nliger_kernel: auto\n")
    cfg, explicit = load_config(TrainConfig, cfg_file, parse_cli_overrides(
        ["--lora-r", "8", "--resume", "--liger-kernel", "false", "--lora-target-modules", "q_proj,v_proj",
         "--max-steps", "null", "--system-prompt", "yes"]))
    assert cfg.lora_r == 8 and isinstance(cfg.lora_r, int)
    assert cfg.learning_rate == pytest.approx(2e-4) and isinstance(cfg.learning_rate, float)  # YAML 1.1 reads "2e-4" as str
    assert cfg.resume is True
    assert cfg.liger_kernel is False
    assert cfg.lora_target_modules == ["q_proj", "v_proj"]
    assert cfg.max_steps is None
    assert cfg.system_prompt == "yes"  # strings stay verbatim
    assert explicit == {"lora_r", "learning_rate", "max_steps", "liger_kernel", "resume", "lora_target_modules",
                        "system_prompt"}
    assert cfg.lora_alpha == 32 and cfg.lora_dropout == 0.05  # untouched defaults


@pytest.mark.parametrize(("text", "argv", "message"), [
    ("lora_rank: 8\n", [], r"c\.yaml: unknown config key 'lora_rank' \(did you mean 'lora_r'\?\)"),
    ("", ["--learnin-rate", "1e-3"], r"command line: unknown config key 'learnin_rate' \(did you mean 'learning_rate'\?\)"),
    ("lora_r: eight\n", [], r"lora_r: 'eight': must be an integer"),
    ("", ["--batching", "zigzag"], r"--batching zigzag: must be one of 'packed', 'padded'"),
    ("", ["--gradient-checkpointing", "maybe"], r"must be true or false"),
    ("", ["--lora-dropout", "1.5"], r"lora_dropout must be in \[0, 1\)"),
    ("max_length: 4096\ntokens_per_micro_batch: 2048\n", [], r"max_length \(4096\) exceeds tokens_per_micro_batch"),
    ("", ["--lora-target-modules", "q_proj,embed_tokens"], r"lora_target_modules has \['embed_tokens'\]"),
    ("- a\n- b\n", [], r"must be a mapping"),
    ("lora_r: [1\n", [], r"c\.yaml:\d+: not valid YAML"),
])
def test_bad_config_gives_one_line_error(tmp_path, text, argv, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_config(TrainConfig, write(tmp_path, text), parse_cli_overrides(argv))
    assert "\n" not in str(e.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(TrainConfig, tmp_path / "nope.yaml")


def test_saved_config_round_trips(tmp_path):
    cfg, _ = load_config(TrainConfig, None, {"lora_r": "4", "system_prompt": "의료 상담", "val_file": "null"})
    save_config(cfg, tmp_path / "r.yaml")
    again, _ = load_config(TrainConfig, tmp_path / "r.yaml")
    assert again == cfg


def test_issue_defaults():
    cfg = TrainConfig()
    assert (cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout) == (16, 32, 0.05)
    assert cfg.lora_target_modules == LORA_TARGET_MODULES and len(set(cfg.lora_target_modules)) == 7
    assert cfg.quantize_4bit and cfg.gradient_checkpointing and cfg.optimizer == "paged_adamw_8bit"
    assert cfg.lr_scheduler == "cosine" and cfg.warmup_ratio > 0 and cfg.max_grad_norm > 0
    assert cfg.batching == "packed"


def test_profile_fills_only_unset_keys():
    cfg = TrainConfig(profile="fast", lora_dropout=0.1)
    fast, name = resolve_profile(cfg, {"profile", "lora_dropout"}, on_gpu=True)
    assert name == "fast"
    assert fast.attn_implementation == PROFILES["fast"]["attn_implementation"]
    assert fast.pad_to_fixed_length is True
    assert fast.lora_dropout == 0.1  # explicit wins over the profile's 0.0
    auto_cpu, name = resolve_profile(TrainConfig(), set(), on_gpu=False)
    assert name == "plain" and auto_cpu.attn_implementation == "sdpa" and auto_cpu.liger_kernel is False
    _, name = resolve_profile(TrainConfig(), set(), on_gpu=True)
    assert name == "lean"


def test_lean_offloads_activations_on_a_gpu_only_and_never_against_an_explicit_choice():
    """lean on a GPU: checkpointed inputs in host memory (measured faster and smaller on the H200); on a CPU it
    would only copy, so not there; an explicit false, or checkpointing turned off explicitly, wins."""
    lean = TrainConfig(profile="lean")
    gpu, _ = resolve_profile(lean, {"profile"}, on_gpu=True)
    assert gpu.offload_activations is True and gpu.gradient_checkpointing is True
    cpu, _ = resolve_profile(lean, {"profile"}, on_gpu=False)
    assert cpu.offload_activations is False
    kept, _ = resolve_profile(TrainConfig(profile="lean", offload_activations=False),
                              {"profile", "offload_activations"}, on_gpu=True)
    assert kept.offload_activations is False
    no_ckpt, _ = resolve_profile(TrainConfig(profile="lean", gradient_checkpointing=False),
                                 {"profile", "gradient_checkpointing"}, on_gpu=True)
    assert no_ckpt.offload_activations is False and no_ckpt.gradient_checkpointing is False
    fast, _ = resolve_profile(TrainConfig(profile="fast"), {"profile"}, on_gpu=True)
    assert fast.offload_activations is False  # nothing checkpointed, nothing to offload


def test_lean_pads_its_rows_on_a_gpu_only_and_a_run_begun_unpadded_resumes_unpadded():
    """lean on a GPU: rows padded to the token budget (one shape for the compiled layers: faster and smaller on the
    H200); on a CPU its rows stay unpadded; an explicit false wins; a run recorded unpadded resumes so."""
    from hai_medqa.train.config import keep_recorded_gpu_keys

    lean = TrainConfig(profile="lean")
    gpu, _ = resolve_profile(lean, {"profile"}, on_gpu=True)
    assert gpu.pad_to_fixed_length is True and gpu.tokens_per_micro_batch == lean.tokens_per_micro_batch
    assert resolve_profile(lean, {"profile"}, on_gpu=False)[0].pad_to_fixed_length is False
    kept, _ = resolve_profile(TrainConfig(profile="lean", pad_to_fixed_length=False),
                              {"profile", "pad_to_fixed_length"}, on_gpu=True)
    assert kept.pad_to_fixed_length is False
    resumed, changed = keep_recorded_gpu_keys(gpu, {"profile"}, {"pad_to_fixed_length": False})
    assert resumed.pad_to_fixed_length is False and changed == {"pad_to_fixed_length": False}
    explicit, changed = keep_recorded_gpu_keys(gpu, {"profile", "pad_to_fixed_length"}, {"pad_to_fixed_length": False})
    assert explicit.pad_to_fixed_length is True and changed == {}


@pytest.mark.parametrize("profile", ["fast", "lean"])
def test_gpu_profiles_add_lora_into_the_nf4_output_in_place_except_on_a_cpu_or_against_an_explicit_choice(profile):
    """fast and lean use lora_kernel fused_nf4 on a GPU (no copy of every projection's output; measured faster on
    the H200); the CPU, plain, FSDP and an explicit choice keep fused (or the choice); a run begun with fused
    resumes with fused."""
    from hai_medqa.train.config import keep_recorded_gpu_keys, settle_config

    cfg = TrainConfig(profile=profile)
    assert resolve_profile(cfg, {"profile"}, on_gpu=True)[0].lora_kernel == "fused_nf4"
    assert resolve_profile(cfg, {"profile"}, on_gpu=False)[0].lora_kernel == "fused"
    assert resolve_profile(TrainConfig(profile="plain"), {"profile"}, on_gpu=True)[0].lora_kernel == "fused"
    kept, _ = resolve_profile(TrainConfig(profile=profile, lora_kernel="peft"), {"profile", "lora_kernel"}, on_gpu=True)
    assert kept.lora_kernel == "peft"
    gpu, _ = resolve_profile(cfg, {"profile"}, on_gpu=True)
    resumed, changed = keep_recorded_gpu_keys(gpu, {"profile"}, {"lora_kernel": "fused"})
    assert resumed.lora_kernel == "fused" and changed == {"lora_kernel": "fused"}
    # FSDP stores the 4-bit weights as floats, which the in-place kernel cannot read
    fsdp, _ = settle_config(cfg, {"profile"}, on_gpu=True, fsdp_version=1, resume=False)
    assert fsdp.lora_kernel == "fused"
    with pytest.raises(ConfigError, match="lora_kernel: 'fused_nf4' does not work under FSDP"):
        settle_config(TrainConfig(profile=profile, lora_kernel="fused_nf4"), {"profile", "lora_kernel"}, on_gpu=True,
                      fsdp_version=1, resume=False)


@pytest.mark.parametrize("profile", ["fast", "lean"])
def test_gpu_profiles_compile_their_layers_except_on_a_cpu_under_fsdp_or_against_an_explicit_false(profile):
    """fast and lean compile each decoder layer on a GPU (measured faster at the same loss on the H200); on a
    CPU it would only add compilation; an explicit false wins; FSDP turns it off again (FSDP1 swaps the
    parameters under the layers), and plain never compiles."""
    cfg = TrainConfig(profile=profile)
    gpu, _ = resolve_profile(cfg, {"profile"}, on_gpu=True)
    assert gpu.compile_layers is True
    cpu, _ = resolve_profile(cfg, {"profile"}, on_gpu=False)
    assert cpu.compile_layers is False
    kept, _ = resolve_profile(TrainConfig(profile=profile, compile_layers=False), {"profile", "compile_layers"},
                              on_gpu=True)
    assert kept.compile_layers is False
    no_ckpt, _ = resolve_profile(TrainConfig(profile=profile, gradient_checkpointing=False),
                                 {"profile", "gradient_checkpointing"}, on_gpu=True)
    assert no_ckpt.compile_layers is True and no_ckpt.offload_activations is False  # offloading needs checkpointing
    fsdp, _ = settle_config(cfg, {"profile"}, on_gpu=True, fsdp_version=1, resume=False)
    assert fsdp.compile_layers is False
    plain, _ = resolve_profile(TrainConfig(profile="plain"), {"profile"}, on_gpu=True)
    assert plain.compile_layers is False


def test_where_layers_cannot_compile_the_profile_runs_them_eagerly_and_an_explicit_request_is_one_line():
    """A GPU without a working Triton (inductor's code generator for CUDA): `fast` and `lean` keep everything
    else and run the layers eagerly; compile_layers: true set by the user stops at start-up in one line."""
    from hai_medqa.train.config import check_compile_layers

    for profile in ("fast", "lean"):
        cfg, _ = settle_config(TrainConfig(profile=profile), {"profile"}, on_gpu=True, fsdp_version=None,
                               resume=False, compile_available=False)
        assert cfg.compile_layers is False and cfg.attn_implementation == "flex_attention"
    assert settle_config(TrainConfig(profile="lean"), {"profile"}, on_gpu=True, fsdp_version=None, resume=False,
                         compile_available=False)[0].offload_activations is True
    asked = TrainConfig(compile_layers=True)
    with pytest.raises(ConfigError, match="compile_layers: true needs .* Triton"):
        check_compile_layers(asked, {"compile_layers"}, compile_available=False)
    check_compile_layers(asked, {"compile_layers"}, compile_available=True)
    check_compile_layers(TrainConfig(), set(), compile_available=False)  # nothing asked, nothing refused


def test_the_layers_compile_on_the_cpu_and_under_another_backend_without_triton(monkeypatch):
    from hai_medqa.train import compile_regions

    assert compile_regions.compiler_available("cpu")
    if not torch.cuda.is_available():  # inductor's CUDA code generator (Triton) cannot work without a GPU
        assert not compile_regions.compiler_available("cuda")
    monkeypatch.setenv(compile_regions.BACKEND_ENV, "aot_eager")
    assert compile_regions.compiler_available("cuda")  # eager kernels: no code generation


def test_a_resumed_run_keeps_the_gpu_profile_keys_it_started_with(tmp_path):
    """A lean run started before its profile gained offloading and compiled layers (recorded false) resumes
    with them still off, and the checkpoint accepts it; a fresh run gets the new keys; a key the user sets
    explicitly is their choice, and the checkpoint refuses that as another recipe."""
    from hai_medqa.run_folder import CHECKPOINTS_DIR, RESOLVED_CONFIG, TRAINER_STATE
    from hai_medqa.train.checkpoint import check_resumable, recorded_config
    from hai_medqa.train.errors import TrainingError

    lean = TrainConfig(profile="lean", train_file="train.jsonl")
    started, _ = resolve_profile(lean, {"profile", "train_file"}, on_gpu=True)
    started = dataclasses.replace(started, offload_activations=False, compile_layers=False)  # as an older release
    save_config(started, tmp_path / RESOLVED_CONFIG)
    (tmp_path / CHECKPOINTS_DIR / "step_0000010").mkdir(parents=True)
    (tmp_path / CHECKPOINTS_DIR / "step_0000010" / TRAINER_STATE).write_text('{"world_size": 1}', encoding="utf-8")
    recorded = recorded_config(tmp_path)

    fresh, _ = settle_config(lean, {"profile", "train_file"}, on_gpu=True, fsdp_version=None, resume=False,
                             recorded=recorded)
    assert fresh.offload_activations is True and fresh.compile_layers is True
    resumed, _ = settle_config(lean, {"profile", "train_file"}, on_gpu=True, fsdp_version=None, resume=True,
                               recorded=recorded)
    assert resumed.offload_activations is False and resumed.compile_layers is False
    check_resumable(tmp_path, resumed, world_size=1)  # the same recipe: accepted
    with pytest.raises(TrainingError, match="compile_layers"):  # without keeping: refused, as before the fix
        check_resumable(tmp_path, dataclasses.replace(resumed, compile_layers=True), world_size=1)
    chosen, _ = settle_config(dataclasses.replace(lean, compile_layers=True), {"profile", "train_file", "compile_layers"},
                              on_gpu=True, fsdp_version=None, resume=True, recorded=recorded)
    assert chosen.compile_layers is True and chosen.offload_activations is False
    # a run that compiled, resumed where nothing compiles: not kept, so the checkpoint refuses in one line
    compiled = dict(recorded, compile_layers=True)
    moved, _ = settle_config(lean, {"profile", "train_file"}, on_gpu=True, fsdp_version=None, resume=True,
                             recorded=compiled, compile_available=False)
    assert moved.compile_layers is False and moved.offload_activations is False


@pytest.mark.parametrize("name", ["exaone35_7.8b_qlora.yaml", "exaone35_2.4b_qlora.yaml", "tiny_cpu.yaml"])
def test_shipped_configs_load(repo_root, name):
    cfg, explicit = load_config(TrainConfig, repo_root / "configs" / name)
    assert explicit  # the file sets keys, all of them known
    assert cfg.quantize_4bit
    if name.startswith("exaone35"):
        assert cfg.model.startswith("LGAI-EXAONE/EXAONE-3.5-")
        assert dataclasses.replace(cfg, model="x", output_dir="x", learning_rate=2e-4) == dataclasses.replace(
            TrainConfig(), model="x", output_dir="x", max_eval_samples=2000)


# --- profile auto: the fastest profile that fits the GPU ------------------------------------------
EXAONE_78B_LLAMA = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 102400,
                    "tie_word_embeddings": False}
EXAONE_24B_LLAMA = {"hidden_size": 2560, "intermediate_size": 7168, "num_hidden_layers": 30,
                    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 80, "vocab_size": 102400,
                    "tie_word_embeddings": True}
EXAONE_32B_LLAMA = {"hidden_size": 5120, "intermediate_size": 27392, "num_hidden_layers": 64,
                    "num_attention_heads": 40, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 102400,
                    "tie_word_embeddings": False}
GIB = 2**30


def test_fast_profile_estimate_covers_the_measured_peak():
    from hai_medqa.train.config import estimate_fast_peak_gib

    # Measured on the H100 (docs/performance.md): 41.5 GiB reserved at 8192 tokens. The estimate must
    # not fall below it (or auto would pick a profile that does not fit) and not waste a whole card.
    est = estimate_fast_peak_gib(EXAONE_78B_LLAMA, 8192)
    assert 41.5 <= est <= 50
    assert estimate_fast_peak_gib(EXAONE_78B_LLAMA, 4096) < est  # fewer tokens, fewer activations


@pytest.mark.parametrize(("model", "gpu_gib", "expected"), [
    (EXAONE_78B_LLAMA, 80, "fast"), (EXAONE_78B_LLAMA, 48, "lean"), (EXAONE_78B_LLAMA, 24, "lean"),
    (EXAONE_78B_LLAMA, 16, "lean"), (EXAONE_24B_LLAMA, 40, "fast"), (EXAONE_24B_LLAMA, 16, "lean"),
    (EXAONE_32B_LLAMA, 80, "lean"), (EXAONE_32B_LLAMA, 141, "lean"),
])
def test_auto_profile_picks_the_fastest_that_fits(model, gpu_gib, expected):
    from hai_medqa.train.config import TrainConfig, resolve_profile

    cfg, name = resolve_profile(TrainConfig(), set(), on_gpu=True, model_config=model, gpu_memory_bytes=gpu_gib * GIB)
    assert name == expected
    assert cfg.gradient_checkpointing is (expected == "lean")


def test_auto_profile_on_cpu_is_plain_and_explicit_keys_win():
    from hai_medqa.train.config import TrainConfig, resolve_profile

    cfg, name = resolve_profile(TrainConfig(), set(), on_gpu=False, model_config=EXAONE_78B_LLAMA,
                                gpu_memory_bytes=80 * GIB)
    assert name == "plain" and cfg.attn_implementation == "sdpa"
    cfg, name = resolve_profile(TrainConfig(lora_dropout=0.1, gradient_checkpointing=True),
                                {"lora_dropout", "gradient_checkpointing"}, on_gpu=True,
                                model_config=EXAONE_78B_LLAMA, gpu_memory_bytes=80 * GIB)
    assert name == "fast" and cfg.lora_dropout == 0.1 and cfg.gradient_checkpointing is True


# --- the config is settled once, then frozen -------------------------------------------------------
def test_settle_config_applies_profile_fsdp_and_resume_once_and_freezes():
    from hai_medqa.train.config import settle_config

    requested = TrainConfig(resume=True)
    cpu, profile = settle_config(requested, set(), on_gpu=False, fsdp_version=None, resume=False)
    assert profile == "plain" and cpu.attn_implementation == "sdpa" and cpu.resume is False
    assert requested.resume is True and requested.liger_kernel == "auto"  # the request itself is untouched
    with pytest.raises(dataclasses.FrozenInstanceError):
        cpu.lora_r = 8
    big, profile = settle_config(TrainConfig(), set(), on_gpu=True, fsdp_version=1, resume=False,
                                 model_config=EXAONE_78B_LLAMA, gpu_memory_bytes=141 * GIB)
    assert profile == "fast" and big.gradient_checkpointing is False
    # FSDP-QLoRA replicates the LoRA weights (fsdp_lora.py): the one-GPU kernel and optimizer stay
    assert (big.lora_kernel, big.optimizer, big.dequantize_cache) == ("fused", "paged_adamw_8bit", False)
    small, profile = settle_config(TrainConfig(), set(), on_gpu=True, fsdp_version=None, resume=True,
                                   model_config=EXAONE_78B_LLAMA, gpu_memory_bytes=24 * GIB)
    assert profile == "lean" and small.gradient_checkpointing is True and small.resume is True
    with pytest.raises(ConfigError, match="dequantize_cache: True does not work under FSDP"):
        settle_config(TrainConfig(dequantize_cache=True), {"dequantize_cache"}, on_gpu=True, fsdp_version=1,
                      resume=False)


def test_settle_config_docstring_example():
    import doctest

    from hai_medqa.train import config

    assert doctest.testmod(config, optionflags=doctest.ELLIPSIS).failed == 0

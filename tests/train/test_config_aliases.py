"""Names users know from Hugging Face/TRL: aliases, peer names with another meaning, and --help."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from hai_medqa.config import ConfigError, describe_keys, load_config, parse_cli_overrides
from hai_medqa.train.config import TrainConfig

REPO = Path(__file__).resolve().parents[2]

# A value for each alias that differs from the project key's default (so mapping it is observable).
ALIAS_VALUES = {
    "num_train_epochs": ("3", 3),
    "optim": ("adamw_torch", "adamw_torch"),
    "lr_scheduler_type": ("linear", "linear"),
    "model_name_or_path": ("some/model", "some/model"),
    "load_in_4bit": ("false", False),
    "bnb_4bit_compute_dtype": ("float16", "float16"),
    "bnb_4bit_quant_storage": ("bfloat16", "bfloat16"),
    "use_liger_kernel": ("true", True),
    "resume_from_checkpoint": ("true", True),
}


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text, encoding="utf-8")
    return p


def test_every_alias_is_covered_and_targets_a_real_key():
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(ALIAS_VALUES) == set(TrainConfig.KEY_ALIASES)
    assert set(TrainConfig.KEY_ALIASES.values()) <= fields
    assert not set(TrainConfig.KEY_ALIASES) & fields  # an alias never shadows a project key
    assert not set(TrainConfig.PEER_KEYS) & (fields | set(TrainConfig.KEY_ALIASES))


@pytest.mark.parametrize("alias", sorted(ALIAS_VALUES))
def test_alias_maps_to_the_same_config_as_the_project_name(tmp_path, alias):
    target = TrainConfig.KEY_ALIASES[alias]
    raw, expected = ALIAS_VALUES[alias]
    assert getattr(TrainConfig(), target) != expected
    by_project_yaml = load_config(TrainConfig, write(tmp_path, f"{target}: {raw}\n"))
    by_alias_yaml = load_config(TrainConfig, write(tmp_path, f"{alias}: {raw}\n"))
    by_alias_cli = load_config(TrainConfig, None, parse_cli_overrides([f"--{alias}", raw]))
    by_alias_cli_dashes = load_config(TrainConfig, None, parse_cli_overrides([f"--{alias.replace('_', '-')}={raw}"]))
    assert getattr(by_alias_yaml[0], target) == expected
    for cfg, explicit in (by_alias_yaml, by_alias_cli, by_alias_cli_dashes):
        assert cfg == by_project_yaml[0]
        assert explicit == {target}  # profiles see the project key as set by the user


def test_command_line_alias_overrides_the_yaml_project_key(tmp_path):
    cfg, _ = load_config(TrainConfig, write(tmp_path, "num_epochs: 5\noptimizer: adamw_8bit\n"),
                         parse_cli_overrides(["--num_train_epochs", "2", "--optim", "adamw_torch"]))
    assert (cfg.num_epochs, cfg.optimizer) == (2, "adamw_torch")


def test_alias_and_project_key_in_one_source_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"c\.yaml: 'num_epochs' and 'num_train_epochs' set the same key 'num_epochs'"):
        load_config(TrainConfig, write(tmp_path, "num_epochs: 1\nnum_train_epochs: 2\n"))


def test_bad_value_under_an_alias_names_the_alias(tmp_path):
    with pytest.raises(ConfigError, match=r"--optim sgd: must be one of"):
        load_config(TrainConfig, None, parse_cli_overrides(["--optim", "sgd"]))
    with pytest.raises(ConfigError, match=r"num_train_epochs: 1\.5: must be an integer"):
        load_config(TrainConfig, write(tmp_path, "num_train_epochs: 1.5\n"))


@pytest.mark.parametrize("peer", sorted(TrainConfig.PEER_KEYS))
def test_peer_name_with_another_meaning_says_what_to_use(tmp_path, peer):
    tool, instead = TrainConfig.PEER_KEYS[peer]
    for args in ((write(tmp_path, f"{peer}: 8\n"), None), (None, parse_cli_overrides([f"--{peer}", "8"]))):
        with pytest.raises(ConfigError) as e:
            load_config(TrainConfig, *args)
        msg = str(e.value)
        assert "\n" not in msg
        assert f"'{peer}'" in msg and tool in msg and instead in msg
        named = [f.name for f in dataclasses.fields(TrainConfig) if f.name in instead]
        assert named, f"{peer}: the hint names no project key"


def test_per_device_train_batch_size_points_at_the_token_budget():
    with pytest.raises(ConfigError, match=r"'per_device_train_batch_size' is a Hugging Face/TRL setting .*tokens_per_micro_batch"):
        load_config(TrainConfig, None, {"per_device_train_batch_size": "4"})


def test_every_key_has_a_description_default_and_allowed_values():
    keys = describe_keys(TrainConfig)
    assert [k.name for k in keys] == [f.name for f in dataclasses.fields(TrainConfig)]
    missing = [k.name for k in keys if not k.description]
    assert not missing, f"fields without a docstring: {missing}"
    by_name = {k.name: k for k in keys}
    assert by_name["lr_scheduler"].allowed == "'cosine' | 'linear' | 'constant'"
    assert by_name["lr_scheduler"].aliases == ("lr_scheduler_type",)
    assert by_name["max_steps"].allowed == "int | null"
    assert by_name["lora_r"].default == 16


def test_s_f2_help_lists_every_key_with_description_default_and_allowed():
    out = subprocess.run([sys.executable, "S_F2.py", "--help"], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout
    for k in describe_keys(TrainConfig):
        assert f"  --{k.name}" in out
        assert f"default: {k.default!r}; allowed: {k.allowed}" in out
    assert "--num_epochs  (also --num_train_epochs)" in out
    assert "Peak learning rate" in out

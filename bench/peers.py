"""Peer arms of bench/train_throughput.py: TRL's SFTTrainer and Unsloth on the same checkpoint, data and
token budget as the project's profiles (issue 17, deliverable 1).

The parent (train_throughput.py, the project's environment) writes the training samples once, tokenised
by the project's own rule (`sft_data.load_tokenized`, exactly what the `fast`/`lean` arms train on), and
starts every peer arm as its own process:

    python bench/peers.py --child '<spec json>'

with the peer's own PYTHONPATH (`--peer-site trl=... unsloth=...`): Unsloth pins transformers <= 5.17
while the project carries 5.23, so the two never share a process. A child imports only torch,
transformers, peft, datasets and its peer - never `hai_medqa` - so a peer's folder holds just what it needs.

Arms (`--peers` selects them by prefix: ``trl``, ``trl:flex``, ``unsloth:ckpt``, ``all``):

| arm | what runs | counterpart |
|---|---|---|
| trl:flex:ckpt / trl:flex:nockpt | SFTTrainer, BFD padding-free packing to the token budget, Liger, flex_attention, gradient checkpointing on / off | lean / fast (same stock pieces) |
| trl:sdpa:ckpt / trl:sdpa:nockpt | the same with sdpa attention | lean / fast (sdpa attention) |
| unsloth:ckpt / unsloth:nockpt | FastLanguageModel on the Llama-layout folder, its SFTTrainer with packing, use_gradient_checkpointing "unsloth" (offloaded) / False | lean / fast (Unsloth's kernels) |

Every arm: NF4 + double quantisation, bf16 compute, LoRA r=16 / alpha=32 / dropout 0 on the seven
projections, paged 8-bit AdamW, constant learning rate, max_grad_norm 1.0, seed 42, one packed row of at
most `tokens` tokens per optimizer step, `warmup` + `steps` optimizer steps. Reported like the project's
arms: real (non-padding) tokens/s over the timed steps (tokens counted from the batches each
`training_step` receives; TRL's logged `num_tokens` kept beside as a check), peak allocated/reserved
memory over the timed steps, the per-step loss and gradient norm, the exact settings and versions.

On a machine without CUDA (the test) an arm runs in float32 without NF4, Liger or paged AdamW (bitsandbytes'
4-bit and Liger's kernels need the GPU); the settings in the result say what ran.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent


# ------------------------------------------------------------------------------------------- arms
@dataclass(frozen=True)
class Arm:
    """One peer configuration."""

    key: str  # e.g. "trl:flex:ckpt"
    peer: str  # "trl" | "unsloth"
    attn: str | None  # attn_implementation (None: the peer's own choice)
    checkpointing: bool

    @property
    def counterpart(self) -> str:
        """The project profile with the same recomputation choice (the one to compare against)."""
        return "lean" if self.checkpointing else "fast"

    @property
    def exact(self) -> bool:
        """True where the arm uses the same stock pieces as the counterpart profile (flex attention, Liger,
        padding-free packing, the same recomputation), so the speed difference is the project's own work."""
        return self.peer == "trl" and self.attn == "flex_attention"

    @property
    def differs(self) -> str:
        """What separates the arm from its counterpart beyond the implementation ('' for exact arms)."""
        if self.exact:
            return ""
        if self.peer == "trl":
            return f"{self.attn} attention"
        return "Unsloth's kernels" + (", activations offloaded to CPU memory" if self.checkpointing else "")

    @property
    def label(self) -> str:
        ckpt = "checkpointing" if self.checkpointing else "no checkpointing"
        if self.peer == "trl":
            return f"TRL SFTTrainer {self.attn}, {ckpt}"
        return f"Unsloth, {'checkpointing unsloth (offloaded)' if self.checkpointing else ckpt}"


ARMS: dict[str, Arm] = {a.key: a for a in (
    Arm("trl:flex:ckpt", "trl", "flex_attention", True),
    Arm("trl:flex:nockpt", "trl", "flex_attention", False),
    Arm("trl:sdpa:ckpt", "trl", "sdpa", True),
    Arm("trl:sdpa:nockpt", "trl", "sdpa", False),
    Arm("unsloth:ckpt", "unsloth", None, True),
    Arm("unsloth:nockpt", "unsloth", None, False),
)}
PEERS = ("trl", "unsloth")

# What a peer's process must be able to import. On a machine without CUDA the arms run without NF4 and
# Liger, so those two are only required with a GPU.
REQUIRED = {
    "trl": ("trl", "datasets", "peft", "transformers", "accelerate"),
    "unsloth": ("unsloth", "unsloth_zoo", "trl", "datasets", "peft", "transformers", "accelerate"),
}
REQUIRED_GPU = {"trl": ("bitsandbytes", "liger_kernel"), "unsloth": ("bitsandbytes",)}

# The carry kit made by bench/peer_wheels.py: which of its folders each process puts on PYTHONPATH, in order.
# The project's arms: transformers 5.23 + the shared folder; TRL: its own folder first, then the project's;
# Unsloth: its own folder and the shared one, over the image's transformers (<= 5.17, as Unsloth requires).
KIT_PATHS = {
    "main": ("site_main", "site_common"),
    "trl": ("site_trl", "site_main", "site_common"),
    "unsloth": ("site_unsloth", "site_common"),
}


class PeerError(ValueError):
    """Bad --peers / --peer-site input (one line, before any heavy work)."""


def median_step_tokens_per_s(tokens: int, walls: list[float]) -> float | None:
    """Tokens per second of a typical timed step: the mean tokens per step over the median step wall (the upper
    median for an even count), so one slow step of either side does not decide a comparison.

    >>> median_step_tokens_per_s(3000, [1.0, 1.0, 4.0])
    1000.0
    """
    if not walls:
        return None
    return (tokens / len(walls)) / sorted(walls)[len(walls) // 2]


def parse_peers(text: str) -> list[str]:
    """Arm keys selected by a comma-separated list of prefixes (``trl``, ``trl:flex``, ``unsloth:nockpt``,
    ``all``), in the ARMS order, each once. Raises PeerError naming an item that selects nothing."""
    chosen: set[str] = set()
    for item in (s.strip().lower() for s in text.split(",")):
        if not item:
            continue
        if item == "all":
            chosen.update(ARMS)
            continue
        parts = item.split(":")
        hits = [k for k in ARMS if k.split(":")[:len(parts)] == parts]
        if not hits:
            raise PeerError(f"--peers: {item!r} selects no arm; known: all, trl, unsloth, {', '.join(ARMS)}")
        chosen.update(hits)
    return [k for k in ARMS if k in chosen]


def parse_peer_sites(items: list[str], kit: str | None = None) -> dict[str, str]:
    """``PEER=PATH[:PATH...]`` items (and/or a kit folder) -> {peer: PYTHONPATH}. An explicit item wins
    over the kit. Raises PeerError on an unknown peer, a missing '=' or a folder that does not exist."""
    sites: dict[str, str] = {}
    if kit:
        root = Path(kit)
        if not root.is_dir():
            raise PeerError(f"--peer-kit: {kit} is not a folder (unpack the kit first: bench/peer_wheels.py unpack)")
        for peer in PEERS:
            sites[peer] = os.pathsep.join(str(root / d) for d in KIT_PATHS[peer])
    for item in items:
        peer, sep, paths = item.partition("=")
        peer = peer.strip().lower()
        if not sep or peer not in PEERS or not paths:
            raise PeerError(f"--peer-site: {item!r} is not PEER=PATH[{os.pathsep}PATH...] with PEER one of {', '.join(PEERS)}")
        missing = [p for p in paths.split(os.pathsep) if p and not Path(p).is_dir()]
        if missing:
            raise PeerError(f"--peer-site {peer}: no such folder: {missing[0]}")
        sites[peer] = paths
    return sites


def peer_env(peer: str, sites: dict[str, str]) -> dict[str, str]:
    """The environment of a peer's process: the parent's, with PYTHONPATH replaced by the peer's site when
    one is given (never the parent's: its transformers may be the wrong one), offline Hub and no telemetry."""
    env = dict(os.environ)
    if peer in sites:
        env["PYTHONPATH"] = sites[peer]
    # One GPU per arm: with several visible, TRL's SFTTrainer refuses (Trainer would use nn.DataParallel).
    # `--gpus` sets it per arm; otherwise the first GPU, like the project's own single-process arms.
    env.setdefault("CUDA_VISIBLE_DEVICES", "0")
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
               TOKENIZERS_PARALLELISM="false")
    if peer == "unsloth":
        env.update(UNSLOTH_DISABLE_STATISTICS="1")
    return env


# Run in the peer's environment: which modules import (by spec, nothing executed), their versions, and the
# peer distribution's own version pins that the folder breaks (e.g. Unsloth's transformers <= 5.17).
_CHECK = r"""
import importlib.metadata as md, importlib.util, json, sys
mods, main = json.loads(sys.argv[1]), sys.argv[2]
def version(name):
    for dist in (name, name.replace("_", "-")):
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            pass
    return "?"
found = {m: (version(m) if importlib.util.find_spec(m) is not None else None) for m in mods}
conflicts = []
try:
    from packaging.requirements import Requirement
    for line in md.requires(main) or []:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name = req.name.replace("-", "_").lower()
        have = found.get(name)
        if have and have != "?" and req.specifier and not req.specifier.contains(have, prereleases=True):
            conflicts.append(f"{main} needs {req.name}{req.specifier}, found {have}")
except Exception:  # no metadata or no packaging: the pins go unchecked, the import check still holds
    pass
print(json.dumps({"found": found, "conflicts": conflicts}))
"""


def check_peer(peer: str, sites: dict[str, str], cuda: bool) -> dict:
    """{"ok", "reason", "versions", "site"} for one peer, from a quick process in its environment."""
    mods = list(REQUIRED[peer]) + (list(REQUIRED_GPU[peer]) if cuda else [])
    where = f"PYTHONPATH={sites[peer]}" if peer in sites else "the benchmark's own environment"
    info = {"site": [Path(p).name for p in sites[peer].split(os.pathsep)] if peer in sites else None}
    try:
        proc = subprocess.run([sys.executable, "-c", _CHECK, json.dumps(mods), peer], env=peer_env(peer, sites),
                              capture_output=True, text=True, timeout=120, check=False)
        out = json.loads(proc.stdout.strip().splitlines()[-1])
    except (subprocess.TimeoutExpired, json.JSONDecodeError, IndexError) as e:
        return {**info, "ok": False, "versions": {}, "reason": f"could not inspect its environment ({where}): {e}"}
    missing = [m for m, v in out["found"].items() if v is None]
    versions = {m: v for m, v in out["found"].items() if v is not None}
    if missing:
        return {**info, "ok": False, "versions": versions,
                "reason": f"{', '.join(missing)} not importable with {where}"}
    if out["conflicts"]:
        return {**info, "ok": False, "versions": versions,
                "reason": "; ".join(out["conflicts"]) + f" (with {where}; give it its own --peer-site)"}
    return {**info, "ok": True, "versions": versions, "reason": None}


# ------------------------------------------------------------------------------------ parent side
def write_peer_data(train_file: str | Path, model_dir: str | Path, out: str | Path, cache_dir: str | Path) -> dict:
    """Write the samples the project's arms train on, as TRL reads pre-tokenised data: one jsonl line per
    sample with ``input_ids`` and ``labels`` (-100 where no loss is taken), plus the same sample as
    conversational ``prompt`` / ``completion`` messages (for `--peer-data conversational`).

    Tokenised exactly as the Trainer does (the tokenizer of the Llama-layout folder, the one tokenizer
    rule, TrainConfig's max_length / overlong / system prompt / train_turns), from the same cache.
    Written to a temp file and renamed. Returns {"samples", "tokens", "loss_tokens"}.
    """
    import dataclasses

    from hai_medqa import chat_format
    from hai_medqa.model.load import load_tokenizer
    from hai_medqa.train.config import TrainConfig
    from hai_medqa.train.sft_data import load_tokenized

    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    tokenizer = load_tokenizer(model_dir)
    chat_ids = chat_format.apply_tokenizer_rule(tokenizer, source=str(model_dir))
    ds = load_tokenized(train_file, tokenizer, max_length=defaults["max_length"], overlong=defaults["overlong"],
                        system_prompt=defaults["system_prompt"], cache_dir=Path(cache_dir), what="train_file",
                        eot_id=chat_ids.eot_id, train_turns=defaults["train_turns"])
    records = [json.loads(line) for line in Path(train_file).read_text(encoding="utf-8").splitlines() if line.strip()]
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    tokens = loss_tokens = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for i in range(len(ds)):
            ids = ds.sample(i)[0].astype("int64").tolist()
            labels = ds.labels(i).tolist()
            line = int(ds.source_lines[i]) if getattr(ds, "source_lines", None) is not None else i + 1
            messages = chat_format.record_to_messages(records[line - 1], defaults["system_prompt"])
            f.write(json.dumps({"input_ids": ids, "labels": labels, "prompt": messages[:-1],
                                "completion": messages[-1:]}, ensure_ascii=False) + "\n")
            tokens += len(ids)
            loss_tokens += sum(1 for x in labels if x != -100)
    os.replace(tmp, out)
    return {"samples": len(ds), "tokens": tokens, "loss_tokens": loss_tokens}


def make_spec(arm_key: str, *, model: str, data_file: str, data_mode: str, tokens: int, warmup: int, steps: int,
              lr: float, lora_targets: list[str], output_dir: str, result_file: str, seed: int = 42) -> dict:
    """The child's instructions for one arm."""
    arm = ARMS[arm_key]
    return {"name": f"peer {arm_key}", "arm": arm_key, "peer": arm.peer, "attn": arm.attn,
            "gradient_checkpointing": arm.checkpointing, "model": model, "data_file": data_file,
            "data_mode": data_mode, "tokens": tokens, "warmup": warmup, "steps": steps, "lr": lr, "seed": seed,
            "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "targets": list(lora_targets)},
            "output_dir": output_dir, "result_file": result_file}


def child_command(spec: dict) -> list[str]:
    """The command line of one arm's process."""
    return [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]


def describe(result: dict) -> dict:
    """Counterpart marks for a finished (or skipped) peer result."""
    arm = ARMS[result["arm"]]
    return {"peer_of": arm.counterpart, "exact_equivalent": arm.exact, "differs": arm.differs, "label": arm.label}


# ------------------------------------------------------------------------------------- child side
def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _load_dataset(spec: dict):
    from datasets import Dataset

    rows = [json.loads(line) for line in Path(spec["data_file"]).read_text(encoding="utf-8").splitlines() if line]
    keep = ("input_ids", "labels") if spec["data_mode"] == "tokenized" else ("prompt", "completion")
    return Dataset.from_list([{k: r[k] for k in keep} for r in rows])


def _sft_kwargs(spec: dict, cuda: bool) -> dict:
    """SFTConfig arguments shared by the TRL and Unsloth arms."""
    return dict(
        output_dir=spec["output_dir"], max_steps=spec["warmup"] + spec["steps"], per_device_train_batch_size=1,
        gradient_accumulation_steps=1, learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0, optim="paged_adamw_8bit" if cuda else "adamw_torch",
        bf16=cuda, logging_steps=1, save_strategy="no", report_to="none", seed=spec["seed"],
        dataloader_num_workers=0, disable_tqdm=True, max_length=spec["tokens"], packing=True,
        completion_only_loss=True if spec["data_mode"] == "conversational" else None,
    )


def _timed_trainer(base_cls, spec: dict, cuda: bool):
    """(trainer subclass counting each step's real tokens and loss, callback timing the steps)."""
    import torch
    from transformers import TrainerCallback

    steps: list[dict] = []
    pending: dict = {"tokens": 0, "loss": 0.0}
    clock = {"last": None}

    def sync():
        if cuda:
            torch.cuda.synchronize()

    class Counting(base_cls):
        def training_step(self, model, inputs, *args, **kwargs):
            # Real tokens: padding-free rows carry no padding; padded rows are counted by their mask.
            mask = inputs.get("attention_mask")
            pending["tokens"] += int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel())
            loss = super().training_step(model, inputs, *args, **kwargs)
            pending["loss"] += float(loss)
            return loss

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            sync()
            clock["last"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            sync()  # the wall includes collation and the logging of the step before: what users get
            now = time.perf_counter()
            steps.append({"step": state.global_step, "tokens": pending["tokens"], "loss": pending["loss"],
                          "wall": now - clock["last"]})
            pending.update(tokens=0, loss=0.0)
            clock["last"] = now
            if state.global_step == spec["warmup"] and cuda:
                torch.cuda.reset_peak_memory_stats()

        def on_log(self, args, state, control, logs=None, **kw):
            for rec in reversed(steps):
                if rec["step"] == state.global_step:
                    for key in ("grad_norm", "num_tokens", "loss"):
                        if logs and key in logs:
                            rec["logged_" + key] = float(logs[key])
                    break

    return Counting, Clock(), steps


def _lora_config(spec: dict):
    from peft import LoraConfig

    lo = spec["lora"]
    return LoraConfig(r=lo["r"], lora_alpha=lo["alpha"], lora_dropout=lo["dropout"], target_modules=lo["targets"],
                      bias="none", task_type="CAUSAL_LM")


def _tokenizer(folder: str):
    # tokenizer.json verbatim, as hai_medqa.model.load.load_tokenizer does (the class named in
    # tokenizer_config.json would rebuild the pre-tokenizer); only pad/ids matter for tokenised data.
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if (Path(folder) / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def _finish(spec: dict, steps: list[dict], settings: dict, versions: dict, cuda: bool, load_s: float) -> dict:
    import torch

    timed = [r for r in steps if r["step"] > spec["warmup"]]
    wall = sum(r["wall"] for r in timed)
    tokens = sum(r["tokens"] for r in timed)
    norms = [r.get("logged_grad_norm") for r in steps]
    logged = [r.get("logged_num_tokens") for r in steps]
    warm_logged = next((r.get("logged_num_tokens") for r in steps if r["step"] == spec["warmup"]), None)
    peaks = ({"peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
              "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30} if cuda else
             {"peak_allocated_gib": float("nan"), "peak_reserved_gib": float("nan")})
    # A peer whose trainer never called training_step (a patched loop) would otherwise report 0 tok/s.
    problem = {} if tokens else {"error": "no tokens counted: the trainer's training_step never saw a batch"}
    return {**problem, "name": spec["name"], "profile": f"peer:{spec['peer']}", "peer": spec["peer"], "arm": spec["arm"],
            "config": settings, "versions": versions, "num_processes": 1,
            "real_tokens_per_s": tokens / wall if wall else float("nan"), "steps_timed": len(timed),
            "tokens_timed": tokens,
            "real_tokens_per_s_median_step": median_step_tokens_per_s(tokens, [r["wall"] for r in timed]),
            # TRL's own count over the same steps (cumulative num_tokens), where it logs one
            "logged_tokens_timed": (logged[-1] - warm_logged) if logged and None not in (logged[-1], warm_logged)
            else None,
            "gradient_checkpointing": spec["gradient_checkpointing"], **peaks,
            "losses": [r["loss"] for r in steps], "grad_norms": norms if None not in norms else [],
            "tokens_per_step": [r["tokens"] for r in steps], "step_walls": [round(r["wall"], 4) for r in steps],
            "load_s": round(load_s, 1)}


def _versions(*names: str) -> dict:
    import importlib.metadata as md

    out = {}
    for n in names:
        for dist in (n, n.replace("_", "-")):
            try:
                out[n] = md.version(dist)
                break
            except md.PackageNotFoundError:
                continue
    return out


def run_trl(spec: dict) -> dict:
    """TRL's SFTTrainer at its documented best: BFD padding-free packing, Liger, NF4 QLoRA."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    cuda = _cuda()
    t0 = time.perf_counter()
    tokenizer = _tokenizer(spec["model"])
    kwargs = {"attn_implementation": spec["attn"], "device_map": {"": 0} if cuda else {"": "cpu"}}
    if cuda:  # QLoRA: NF4 + double quantisation, bf16 compute (bitsandbytes' 4-bit needs the GPU)
        kwargs.update(dtype=torch.bfloat16, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16))
    else:
        kwargs.update(dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(spec["model"], **kwargs)
    sft = dict(_sft_kwargs(spec, cuda), packing_strategy="bfd", padding_free=True, use_liger_kernel=cuda,
               gradient_checkpointing=spec["gradient_checkpointing"])
    args = SFTConfig(**sft)
    Counting, clock, steps = _timed_trainer(SFTTrainer, spec, cuda)
    trainer = Counting(model=model, args=args, train_dataset=_load_dataset(spec), processing_class=tokenizer,
                       peft_config=_lora_config(spec), callbacks=[clock])
    load_s = time.perf_counter() - t0
    trainer.train()
    settings = {**{k: v for k, v in sft.items() if k not in ("output_dir", "disable_tqdm", "report_to")},
                "attn_implementation": model.config._attn_implementation, "quantization": "nf4+double" if cuda
                else "none (CPU)", "compute_dtype": "bfloat16" if cuda else "float32", "lora": spec["lora"],
                "data": spec["data_mode"], "padding_free_used": trainer.padding_free,
                "completion_only_loss_used": trainer.completion_only_loss}
    return _finish(spec, steps, settings, _versions("trl", "transformers", "peft", "datasets", "accelerate",
                                                    "bitsandbytes", "liger_kernel", "torch"), cuda, load_s)


def run_unsloth(spec: dict) -> dict:
    """Unsloth's FastLanguageModel on the Llama-layout folder, its patched SFTTrainer with packing."""
    # Unsloth must be imported before transformers/trl/peft so that its patches apply: no sorting here.
    import torch  # noqa: I001
    import unsloth  # noqa: F401
    from unsloth import FastLanguageModel
    from trl import SFTConfig, SFTTrainer

    cuda = _cuda()
    t0 = time.perf_counter()
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=spec["model"], max_seq_length=spec["tokens"], load_in_4bit=True, dtype=torch.bfloat16,
        local_files_only=True)
    model = FastLanguageModel.get_peft_model(
        model, r=spec["lora"]["r"], lora_alpha=spec["lora"]["alpha"], lora_dropout=spec["lora"]["dropout"],
        target_modules=spec["lora"]["targets"], bias="none", random_state=spec["seed"],
        use_gradient_checkpointing="unsloth" if spec["gradient_checkpointing"] else False)
    # Checkpointing is Unsloth's own (get_peft_model above); the Trainer's flag stays off so it adds none.
    sft = dict(_sft_kwargs(spec, cuda), gradient_checkpointing=False)
    args = SFTConfig(**sft)
    Counting, clock, steps = _timed_trainer(SFTTrainer, spec, cuda)
    trainer = Counting(model=model, args=args, train_dataset=_load_dataset(spec), processing_class=tokenizer,
                       callbacks=[clock])
    load_s = time.perf_counter() - t0
    trainer.train()
    settings = {**{k: v for k, v in sft.items() if k not in ("output_dir", "disable_tqdm", "report_to")},
                "use_gradient_checkpointing": "unsloth" if spec["gradient_checkpointing"] else False,
                "packing_strategy_used": getattr(trainer.args, "packing_strategy", None),
                "padding_free_used": getattr(trainer.args, "padding_free", None),
                "attn_implementation": getattr(model.config, "_attn_implementation", None),
                "quantization": "nf4 (load_in_4bit)", "compute_dtype": "bfloat16", "lora": spec["lora"],
                "data": spec["data_mode"]}
    return _finish(spec, steps, settings, _versions("unsloth", "unsloth_zoo", "trl", "transformers", "peft",
                                                    "datasets", "bitsandbytes", "torch"), cuda, load_s)


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="one peer arm of bench/train_throughput.py (run by it)")
    ap.add_argument("--child", required=True, help="the arm's spec as JSON")
    spec = json.loads(ap.parse_args(argv).child)
    Path(spec["output_dir"]).mkdir(parents=True, exist_ok=True)
    result = run_trl(spec) if spec["peer"] == "trl" else run_unsloth(spec)
    out = Path(spec["result_file"])
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

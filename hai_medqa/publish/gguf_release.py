"""The GGUF release of a merged model: GGUF files, an Ollama Modelfile, the EXAONE LICENSE and a card,
in a folder of their own that is uploaded to ``<repo>-GGUF`` (the Hub's custom for GGUF builds).

    python merge_and_upload.py ... --output outputs/merged --gguf f16,q8_0,q4_k_m [--push]

writes ``outputs/merged-GGUF/`` beside the merged folder (never inside it: the merged repo's upload
would carry the GGUF files too).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml
from loguru import logger

from hai_medqa import __version__
from hai_medqa.chat_format import EOT
from hai_medqa.io_utils import atomic_dir, atomic_write_text, write_json
from hai_medqa.publish.gguf_export import GGUFExportError, export_gguf, parse_gguf_types
from hai_medqa.publish.ollama import MODELFILE_NAME, write_modelfile
from hai_medqa.run_folder import MERGE_INFO, trained_system_prompt

GGUF_REPO_SUFFIX = "-GGUF"
GGUF_INFO = "gguf_info.json"


def gguf_repo_id(repo_id: str) -> str:
    """'owner/EXAONE-…-HAI-MedQA' -> 'owner/EXAONE-…-HAI-MedQA-GGUF'."""
    return repo_id if repo_id.endswith(GGUF_REPO_SUFFIX) else repo_id + GGUF_REPO_SUFFIX


def default_gguf_dir(merged_dir: str | Path) -> Path:
    """Where the GGUF release goes by default: a sibling ``<merged>-GGUF`` folder."""
    merged_dir = Path(merged_dir)
    return merged_dir.with_name(merged_dir.name + GGUF_REPO_SUFFIX)


def _fingerprint(merged_dir: Path, types: Sequence[str]) -> str | None:
    """What identifies a finished export: the merge record (base, adapter bytes, mode) and the types."""
    info = merged_dir / MERGE_INFO
    if not info.is_file():
        return None
    h = hashlib.sha256(info.read_bytes())
    h.update(json.dumps(list(types)).encode())
    return h.hexdigest()


def existing_gguf_matches(out_dir: Path, merged_dir: Path, types: Sequence[str]) -> bool:
    """True when `out_dir` is a complete GGUF release of this very merge with these types."""
    fp = _fingerprint(merged_dir, types)
    try:
        info = json.loads((out_dir / GGUF_INFO).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return fp is not None and info.get("fingerprint") == fp and all(
        (out_dir / r["file"]).is_file() for r in info.get("files", []))


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def render_gguf_card(*, repo_id: str, merged_repo_id: str, files: list[dict], modelfile_from: str,
                     system_prompt: str | None) -> str:
    """README.md of the GGUF repo: metadata (base_model = the merged repo, relation quantized), the
    files, and how to run them in llama.cpp, Ollama and LM Studio."""
    from huggingface_hub import ModelCardData

    from hai_medqa.publish.license import EXAONE_CITATION, EXAONE_LICENSE_NAME, EXAONE_LICENSE_URL

    meta = ModelCardData(
        base_model=merged_repo_id, base_model_relation="quantized", license="other",
        license_name=EXAONE_LICENSE_NAME, license_link="LICENSE", language=["ko"], library_name="gguf",
        pipeline_tag="text-generation", tags=["exaone", "korean", "medical", "gguf", "llama.cpp", "ollama",
                                              "hai-medqa"],
    ).to_dict()
    name = repo_id.rsplit("/", 1)[-1]
    rows = "\n".join(f"| `{f['file']}` | {f['type'].upper()} | {_size(f['bytes'])} |" for f in files)
    first = files[0]["file"]
    sys_note = ("The Modelfile sets the system prompt the model was trained with (`SYSTEM`)." if system_prompt
                else "The model was trained without a system prompt; the template then renders EXAONE's empty "
                     "system turn, as in training.")
    sections = [
        "---\n" + yaml.safe_dump(meta, allow_unicode=True, sort_keys=False).strip() + "\n---",
        f"# {name}\n\nGGUF builds of [{merged_repo_id}](https://huggingface.co/{merged_repo_id}) for llama.cpp, "
        "Ollama and LM Studio, written by the HAI MedQA pipeline with llama.cpp's own tooling (the `gguf` package; "
        "k-quants by llama.cpp's `llama_model_quantize`). Architecture `llama`, RoPE as the model has it "
        "(llama3 scaling as the `rope_freqs` tensor), pre-tokenizer `exaone`, EOS `[|endofturn|]`, no BOS, "
        "and EXAONE-3.5's chat template embedded (`tokenizer.chat_template`).",
        "## 의료 면책 고지 / Medical disclaimer\n\n"
        "이 모델은 연구용이며 의료 조언, 진단 또는 치료를 대신하지 않습니다. 건강 문제는 반드시 의료 전문가와 "
        "상담하고, 응급 상황에서는 즉시 119에 연락하십시오.\n\n"
        "For research only; not medical advice, diagnosis or treatment. Consult a qualified professional, and "
        "call emergency services (119 in Korea) in an emergency.",
        "## Files\n\n| file | type | size |\n|---|---|---|\n" + rows,
        "## llama.cpp\n\n```bash\n"
        f"llama-cli -m {first} --jinja -cnv\n"
        f"llama-server -m {first} --jinja\n```\n\n"
        "Use `--jinja`: it renders the embedded template exactly. llama.cpp's built-in EXAONE template (used "
        "without it) drops the empty `[|system|][|endofturn|]` turn that EXAONE renders when there is no system "
        "message, so prompts would differ from training.",
        f"## Ollama\n\n```bash\nollama create {name.lower()} -f {MODELFILE_NAME}\nollama run {name.lower()}\n```\n\n"
        f"`{MODELFILE_NAME}` uses `{modelfile_from}` (edit `FROM` for another file). Its `TEMPLATE` renders exactly "
        f"as EXAONE's chat template, including the empty system turn, and generation stops at `{EOT}`. {sys_note}",
        "## LM Studio\n\nDownload a `.gguf` file of this repo (or load it from disk). LM Studio takes the prompt "
        "template from the file's embedded jinja chat template, which is EXAONE's own; keep the template as "
        f"detected, and check that the stop string is `{EOT}`. Set the system prompt in the chat settings if you "
        "want one.",
        "## License\n\n"
        f"Derived from EXAONE 3.5 and distributed under the [EXAONE AI Model License Agreement 1.1 - NC]"
        f"({EXAONE_LICENSE_URL}) (see `LICENSE`): research and non-commercial use only; modified models must keep "
        "names starting with \"EXAONE\"; the agreement must accompany every copy; the model and its outputs may not "
        "be used to develop other models.",
        "## Citation\n\n```bibtex\n" + EXAONE_CITATION + "\n```",
    ]
    return "\n\n".join(sections) + "\n"


def build_gguf_release(merged_dir: str | Path, types: str | Sequence[str], *, repo_id: str,
                       out_dir: str | Path | None = None, overwrite: bool = False, progress: bool = True) -> Path:
    """Export `merged_dir` to GGUF (`types`) with Modelfile, LICENSE, card and gguf_info.json into
    `out_dir` (default ``<merged>-GGUF``); the folder appears only when complete. A finished export of
    the same merge and types is reused. `repo_id` is the merged model's repo (the card links it)."""
    from hai_medqa.merge.streaming import check_output_path
    from hai_medqa.publish.license import find_license_file, write_license

    type_list = parse_gguf_types(types)
    merged_dir = Path(merged_dir)
    out = Path(out_dir) if out_dir is not None else default_gguf_dir(merged_dir)
    if not overwrite and existing_gguf_matches(out, merged_dir, type_list):
        logger.info(f"{out} already holds this GGUF export; reusing it")
        return out
    check_output_path(out, [merged_dir], overwrite)
    basename = repo_id.rsplit("/", 1)[-1]
    system_prompt = trained_system_prompt(merged_dir)
    with atomic_dir(out) as tmp:
        records = export_gguf(merged_dir, tmp, type_list, basename=basename, progress=progress)
        write_license(tmp, merged_dir)
        license_file = find_license_file(tmp)
        modelfile_from = records[0]["file"]
        write_modelfile(tmp, modelfile_from, system_prompt=system_prompt,
                        license_text=license_file.read_text(encoding="utf-8") if license_file else None)
        atomic_write_text(tmp / "README.md", render_gguf_card(
            repo_id=gguf_repo_id(repo_id), merged_repo_id=repo_id, files=records,
            modelfile_from=modelfile_from, system_prompt=system_prompt))
        write_json(tmp / GGUF_INFO, {
            "hai_medqa_gguf": 1, "hai_medqa": __version__, "fingerprint": _fingerprint(merged_dir, type_list),
            "types": type_list, "files": records, "modelfile": modelfile_from,
            "system_prompt": system_prompt, "versions": _versions(),
        })
    logger.info(f"wrote GGUF release {out} ({', '.join(r['file'] for r in records)})")
    return out


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("gguf", "llama_cpp_python", "numpy"):
        with contextlib.suppress(PackageNotFoundError):
            out[pkg] = version(pkg.replace("_", "-"))
    return out


@dataclass
class GGUFReleaseResult:
    """The GGUF folder, its repo id and the upload plan (None without --push/--dry-run)."""

    folder: Path
    repo_id: str
    plan: object | None


def make_gguf_release(merged_dir: str | Path, types: str | Sequence[str], *, repo_id: str,
                      out_dir: str | Path | None = None, push: bool = False, dry_run: bool = False,
                      private: bool = True, allow_noncompliant_name: bool = False, overwrite: bool = False,
                      api=None) -> GGUFReleaseResult:
    """Build the GGUF release of `merged_dir` and, with `push`, upload it to ``<repo_id>-GGUF``
    (`dry_run`: print the plan only). `repo_id` is the merged model's full repo id."""
    from hai_medqa.publish.hub import publish

    folder = build_gguf_release(merged_dir, types, repo_id=repo_id, out_dir=out_dir, overwrite=overwrite)
    target = gguf_repo_id(repo_id)
    plan = None
    if push or dry_run:
        plan = publish(folder, target, private=private, dry_run=dry_run or not push,
                       allow_noncompliant_name=allow_noncompliant_name, commit_message="Upload HAI MedQA GGUF",
                       api=api)
    return GGUFReleaseResult(folder, target, plan)


__all__ = ["GGUFExportError", "build_gguf_release", "default_gguf_dir", "gguf_repo_id", "make_gguf_release",
           "render_gguf_card"]


def _main(argv: list[str] | None = None) -> int:
    """``python -m hai_medqa.publish.gguf_release MERGED --repo-id ID --types f16,q8_0`` exports an
    existing merged folder (merge_and_upload.py --gguf does the same right after the merge)."""
    import argparse

    from hai_medqa.logging_setup import setup_logging

    p = argparse.ArgumentParser(prog="python -m hai_medqa.publish.gguf_release", description=_main.__doc__)
    p.add_argument("merged", help="merged model folder (merge_and_upload.py --output)")
    p.add_argument("--repo-id", required=True, help="the merged model's repo id (files are named after it)")
    p.add_argument("--types", default="f16,q8_0", help="llama.cpp types, comma-separated (default f16,q8_0)")
    p.add_argument("--output", help="GGUF folder (default: <merged>-GGUF)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing GGUF folder (after success)")
    args = p.parse_args(argv)
    setup_logging()
    folder = build_gguf_release(args.merged, args.types, repo_id=args.repo_id, out_dir=args.output,
                                overwrite=args.overwrite)
    print(folder)
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command line through the one CLI wrapper (one `error: ...` line and exit 1 for a user error)."""
    from hai_medqa.cli import run_cli

    return run_cli(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())

"""Peak memory of the EXAONE -> Llama conversion versus the largest shard (issue 3).

Builds a random EXAONE-layout checkpoint of >= 1 GB in several bf16 shards, then converts it in a
fresh child process and reports that process's peak RSS next to (a) the largest shard and (b) the
RSS of a child that only imports the same modules (the fixed cost of Python + torch + transformers).
The converter copies tensor bytes through one reused 16 MiB buffer, so peak RSS - baseline stays well below one
shard whatever the model size.

    .venv/bin/python bench/convert_memory.py                    # ~1.1 GB, 256 MiB shards
    .venv/bin/python bench/convert_memory.py --layers 64 --shard-mb 1024 --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD_IMPORTS = ("import resource, torch, transformers, safetensors; from transformers import LlamaConfig; "
                 "import hai_medqa.model.convert as c")
REPORT_PEAK = "; print('PEAK_KIB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"


def child_peak_rss_mib(code: str) -> tuple[float, float]:
    """Run `code` in a fresh interpreter; return (its own peak RSS in MiB, wall seconds)."""
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code + REPORT_PEAK], check=True, cwd=REPO,  # cwd: import hai_medqa
                          stdout=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t
    peak_kib = int(proc.stdout.split("PEAK_KIB")[-1].strip())
    return peak_kib / 1024, wall


def _machine() -> str:
    import os

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or platform.machine())
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} CPU cores, {ram:.0f} GiB RAM, {platform.system()}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--shard-mb", type=int, default=256)
    p.add_argument("--workdir", help="where to build (default: a temporary folder, removed afterwards)")
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args()

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="convert_memory_"))
    src, dst = work / "exaone", work / "llama"
    shape = {"hidden_size": args.hidden, "num_layers": args.layers, "num_attention_heads": 16,
             "num_key_value_heads": 4, "head_dim": args.hidden // 16, "intermediate_size": 4 * args.hidden,
             "vocab_size": 32000, "torch_dtype": "bfloat16"}
    try:
        baseline, _ = child_peak_rss_mib(CHILD_IMPORTS)
        if not (src / "config.json").exists():
            # Built in its own process: Linux folds a parent's RSS at fork into the child's ru_maxrss,
            # so this (light) parent must never hold the checkpoint itself.
            subprocess.run([sys.executable, "-c", "from hai_medqa.fixtures.tiny_model import build_exaone_checkpoint as b; "
                            f"b({str(src)!r}, {shape!r}, max_shard_bytes={args.shard_mb * 2**20})"],
                           check=True, cwd=REPO)
        shards = sorted(src.glob("*.safetensors"))
        total = sum(s.stat().st_size for s in shards) / 2**20
        largest = max(s.stat().st_size for s in shards) / 2**20
        shutil.rmtree(dst, ignore_errors=True)
        peak, wall = child_peak_rss_mib(
            f"{CHILD_IMPORTS}; c.convert_exaone_to_llama({str(src)!r}, {str(dst)!r}, overwrite=True)")
        result = {
            "date": date.today().isoformat(),
            "machine": _machine(),
            "checkpoint_mib": round(total), "shards": len(shards), "largest_shard_mib": round(largest),
            "baseline_rss_mib": round(baseline), "convert_peak_rss_mib": round(peak),
            "convert_extra_over_baseline_mib": round(peak - baseline),
            "extra_as_fraction_of_largest_shard": round((peak - baseline) / largest, 3),
            "convert_wall_s": round(wall, 1), "throughput_mib_s": round(total / wall),
        }
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The wheels the GPU machine lacks, packed into one small carry kit for bench/train_throughput.py --peers.

The device machine (docs/performance.md, "Running the peers") has torch, Triton, accelerate and an older
transformers, no internet, and takes at most 64 MiB of files per call. The project's own wheels alone come
to 56 MB (bitsandbytes 43 MB of it), too much to add TRL and Unsloth. So here, on a machine with pip:

    python3 bench/peer_wheels.py build      # download, unpack, trim, pack: .gpu_kit/carry/*.tar.xz

downloads every wheel with `pip download --no-deps` for CPython 3.12 on manylinux x86-64, unpacks them into
four folders ready for PYTHONPATH, and packs each folder as a tar.xz (Python source compresses ~4x better
solid than in a wheel's zip). Two trims do most of the rest: bitsandbytes keeps only the library torch
2.11+cu130 loads (`libbitsandbytes_cuda130.so`; see `BNB_KEEP`) and its CPU one, and Unsloth drops its web
UI (`studio/`) and command line, which training does not import.

| folder | holds | on PYTHONPATH of |
|---|---|---|
| site_common | bitsandbytes (trimmed), peft, liger-kernel, loguru, dill, multiprocess | every process |
| site_main | transformers 5.23 (the project's pin) | the project's arms, TRL |
| site_trl | trl 1.16, datasets 5.x | TRL |
| site_unsloth | unsloth (trimmed), unsloth_zoo, trl <= 1.15, datasets < 5 and their small needs | Unsloth (over the image's transformers 5.17) |

On the device (carry `.gpu_kit/carry`), before the benchmark:

    python3 bench/peer_wheels.py unpack --to /tmp/kit      # prints the PYTHONPATH of the project's arms

and `--peer-kit /tmp/kit` gives each peer its own PYTHONPATH (bench/peers.py KIT_PATHS).

`build` also checks every wheel's Requires-Dist against the image's package list (IMAGE_PACKAGES, from
the device docs) and the kit itself, and fails if the kit is over `--max-mib`. The project's own pins are
read from requirements.txt; the peers' pins live here. Never torch, triton or nvidia-* (the image's own).
"""

from __future__ import annotations

import argparse
import email.parser
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import KIT_PATHS  # noqa: E402 - bench/peers.py (no heavy imports at its top)

REPO = Path(__file__).resolve().parents[1]
KIT = REPO / ".gpu_kit"

# The project's pins that travel (requirements.txt gives the versions), and the peers' pins.
PROJECT_WHEELS = {"site_common": ["bitsandbytes", "peft", "liger-kernel", "loguru"], "site_main": ["transformers"]}
PEER_WHEELS = {
    # datasets' needs, shared by both peers' datasets versions (dill < 0.4.2, multiprocess < 0.70.20)
    "site_common": ["dill==0.4.1", "multiprocess==0.70.19"],
    "site_trl": ["trl==1.16.0", "datasets==5.2.0"],
    # Unsloth 2026.10.9 pins transformers <= 5.17, trl <= 1.15, datasets < 5 (docs: ../shared/reference/peers.md)
    "site_unsloth": ["unsloth==2026.10.9", "unsloth_zoo==2026.10.9", "trl==1.15.0", "datasets==4.8.5",
                     "tyro==1.0.17", "docstring-parser==0.18.0", "typeguard==4.6.1", "msgspec==0.23.0",
                     "json5==0.17.3", "nest-asyncio==1.6.0", "structlog==26.1.0", "cut-cross-entropy==25.1.1"],
}
SITES = ("site_common", "site_main", "site_trl", "site_unsloth")
# Which folders each process sees, in order: bench/peers.py KIT_PATHS (the one place that says it).
SITE_PATH = {"site_common": ("site_common",), "site_main": KIT_PATHS["main"], "site_trl": KIT_PATHS["trl"],
             "site_unsloth": KIT_PATHS["unsloth"]}

# bitsandbytes 0.50.2 picks its library by torch.version.cuda (cextension.get_cuda_bnb_library_path): an
# exact match first, else the highest of the same major below it. The image's torch 2.11.0+cu130 reports
# "13.0", so libbitsandbytes_cuda130.so is the one loaded; the CPU one lets the package import without CUDA.
BNB_KEEP = {"libbitsandbytes_cuda130.so", "libbitsandbytes_cpu.so"}
DROP = {"unsloth": ("studio", "unsloth_cli")}  # the web UI and its command line: not imported by training

PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")
NEVER = re.compile(r"^(torch|triton|nvidia-.*)$")

# The device image's Python packages (docs: the device machine's KINDS.md, read 2026-11-17).
_IMAGE_LIST = """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft
pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
"""
IMAGE_PACKAGES = set(_IMAGE_LIST.split())
# Declared but not needed by the arms (imported lazily or behind try/except; the H200 runs of 2026-11-29
# went without them): not carried.
OPTIONAL = {
    "xformers": "Unsloth falls back to PyTorch attention",
    "torchao": "Unsloth's float8/QAT paths only",
    "diffusers": "Unsloth's diffusion models only",
    "hf-transfer": "faster Hub downloads; the device is offline",
    "pydantic": "Unsloth's CLI / OpenEnv paths only",
}


def norm(name: str) -> str:
    """PEP 503 name: lower case, runs of -_. as one '-'."""
    return re.sub(r"[-_.]+", "-", name).lower()


def project_pins(requirements: Path = REPO / "requirements.txt") -> dict[str, str]:
    """{normalised name: exact version} of requirements.txt's `name==version` lines."""
    pins = {}
    for line in requirements.read_text(encoding="utf-8").splitlines():
        m = re.match(r"^\s*([A-Za-z0-9_.-]+)\s*==\s*([^\s;#]+)", line)
        if m:
            pins[norm(m.group(1))] = m.group(2)
    return pins


def kit_plan(requirements: Path = REPO / "requirements.txt") -> dict[str, list[str]]:
    """{site: [name==version, ...]}: the project's travelling pins from requirements.txt, then the peers'."""
    pins = project_pins(requirements)
    plan: dict[str, list[str]] = {s: [] for s in SITES}
    for site, names in PROJECT_WHEELS.items():
        for n in names:
            if norm(n) not in pins:
                raise SystemExit(f"{requirements}: no exact pin for {n} (the kit carries the project's exact versions)")
            plan[site].append(f"{n}=={pins[norm(n)]}")
    for site, reqs in PEER_WHEELS.items():
        plan[site].extend(reqs)
    for reqs in plan.values():
        for r in reqs:
            if NEVER.match(norm(r.split("==")[0])):
                raise SystemExit(f"kit plan: {r} must not travel (the image's own torch/triton/CUDA libraries)")
    return plan


def wheel_for(wheels: Path, req: str) -> Path | None:
    """The downloaded wheel of `name==version` in `wheels`, if there."""
    name, version = req.split("==")
    for w in sorted(wheels.glob("*.whl")):
        parts = w.name.split("-")
        if norm(parts[0]) == norm(name) and parts[1] == version:
            return w
    return None


def download(req: str, wheels: Path) -> Path:
    """pip download --no-deps of one pinned wheel for CPython 3.12 / manylinux x86-64 (skipped when present)."""
    have = wheel_for(wheels, req)
    if have:
        return have
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
           "3.12", "--implementation", "cp", *(x for p in PLATFORMS for x in ("--platform", p)), "--platform", "any",
           "-d", str(wheels), req]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    got = wheel_for(wheels, req)
    if proc.returncode != 0 or got is None:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"pip download {req}: failed ({last})")
    return got


def requires(wheel: Path) -> list[str]:
    """Requirement names a wheel declares for Linux x86-64 CPython 3.12 (no extras)."""
    from packaging.requirements import Requirement

    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        msg = email.parser.Parser().parsestr(z.read(meta).decode("utf-8"))
    env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
           "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}
    names = []
    for line in msg.get_all("Requires-Dist") or []:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate(env):
            names.append(norm(req.name))
    return sorted(set(names))


def unpack_wheel(wheel: Path, dest: Path) -> None:
    """Extract a wheel into a PYTHONPATH folder, trimmed (BNB_KEEP, DROP; no *.data scripts)."""
    name = norm(wheel.name.split("-")[0])
    with zipfile.ZipFile(wheel) as z:
        for member in z.namelist():
            top = member.split("/")[0]
            base = member.rsplit("/", 1)[-1]
            if top.endswith(".data") or top in DROP.get(name, ()):
                continue
            if name == "bitsandbytes" and base.startswith("libbitsandbytes_") and base not in BNB_KEEP:
                continue
            z.extract(member, dest)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def pack(folder: Path, out: Path) -> None:
    """Deterministic tar.xz of a folder (sorted names, no owners, fixed times), written via a temp file."""
    def clean(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.mtime = 0
        return info

    tmp = out.with_name(f".{out.name}.tmp")
    with tarfile.open(tmp, "w:xz", preset=6) as tar:
        for p in sorted(folder.rglob("*")):
            tar.add(p, arcname=str(p.relative_to(folder)), recursive=False, filter=clean)
    os.replace(tmp, out)


def check_requires(plan: dict[str, list[str]], wheels: dict[str, Path]) -> dict[str, list[str]]:
    """{site: ["wheel needs X", ...]} for declared needs neither in the image, nor on the site's own
    PYTHONPATH, nor in OPTIONAL."""
    in_site = {s: {norm(r.split("==")[0]) for r in plan[s]} for s in SITES}
    problems: dict[str, list[str]] = {}
    for site in SITES:
        visible = set().union(*(in_site[s] for s in SITE_PATH[site])) | IMAGE_PACKAGES
        for req in plan[site]:
            for need in requires(wheels[req]):
                if need not in visible and need not in OPTIONAL:
                    problems.setdefault(site, []).append(f"{req} needs {need}")
    return problems


def ensure_excluded(repo: Path = REPO) -> None:
    """Keep the kit out of git: `/.gpu_kit/` in .git/info/exclude (local to this checkout)."""
    exclude = repo / ".git" / "info" / "exclude"
    if exclude.parent.is_dir():
        text = exclude.read_text(encoding="utf-8") if exclude.exists() else ""
        if "/.gpu_kit/" not in text.split():
            with exclude.open("a", encoding="utf-8") as f:
                f.write(("" if text.endswith("\n") or not text else "\n") + "/.gpu_kit/\n")


def build(kit: Path, max_mib: float) -> dict:
    """Download, unpack, trim and pack every site; write carry/MANIFEST.json; return it."""
    plan = kit_plan()
    wheels_dir, sites_dir, carry = kit / "wheels", kit / "sites", kit / "carry"
    for d in (wheels_dir, sites_dir, carry):
        d.mkdir(parents=True, exist_ok=True)
    wheels = {req: download(req, wheels_dir) for site in SITES for req in plan[site]}
    problems = check_requires(plan, wheels)
    for site, lines in problems.items():
        for line in lines:
            print(f"warning: {site}: {line}, which is neither in the device image nor in the kit")
    manifest = {"python": "cp312", "platforms": list(PLATFORMS), "sites": {}, "missing_requirements": problems}
    for site in SITES:
        dest = sites_dir / site
        tmp = sites_dir / f".{site}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for req in plan[site]:
            unpack_wheel(wheels[req], tmp)
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
        out = carry / f"{site}.tar.xz"
        pack(dest, out)
        manifest["sites"][site] = {
            "wheels": {req: wheels[req].name for req in plan[site]},
            "wheel_bytes": sum(wheels[req].stat().st_size for req in plan[site]),
            "unpacked_bytes": folder_bytes(dest), "packed_bytes": out.stat().st_size,
            "sha256": hashlib.sha256(out.read_bytes()).hexdigest()}
    total = sum(s["packed_bytes"] for s in manifest["sites"].values())
    manifest["packed_bytes_total"] = total
    (carry / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    print(f"{'folder':<14} {'wheels':>9} {'unpacked':>9} {'carried':>9}")
    for site, s in manifest["sites"].items():
        print(f"{site:<14} {s['wheel_bytes'] / 2**20:>8.1f}M {s['unpacked_bytes'] / 2**20:>8.1f}M "
              f"{s['packed_bytes'] / 2**20:>8.1f}M")
    print(f"{'total':<14} {'':>9} {'':>9} {total / 2**20:>8.1f}M  -> {carry} (carry: .gpu_kit/carry)")
    if total > max_mib * 2**20:
        raise SystemExit(f"kit is {total / 2**20:.1f} MiB, over --max-mib {max_mib}")
    return manifest


def unpack(src: Path, to: Path) -> dict[str, Path]:
    """Extract every carry/<site>.tar.xz into to/<site> (replacing an older copy); {site: folder}."""
    archives = sorted(src.glob("site_*.tar.xz"))
    if not archives:
        raise SystemExit(f"{src}: no site_*.tar.xz (build the kit with `bench/peer_wheels.py build` and carry "
                         ".gpu_kit/carry)")
    to.mkdir(parents=True, exist_ok=True)
    done = {}
    for archive in archives:
        site = archive.name[: -len(".tar.xz")]
        dest, tmp = to / site, to / f".{site}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        with tarfile.open(archive, "r:xz") as tar:
            tar.extractall(tmp, filter="data")
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
        done[site] = dest
    return done


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="download the wheels here and pack the carry kit (.gpu_kit/carry)")
    b.add_argument("--kit", default=str(KIT), help="kit folder (default: .gpu_kit in the repo root)")
    b.add_argument("--max-mib", type=float, default=55.0, help="fail when the carried kit is larger (default 55)")
    u = sub.add_parser("unpack", help="on the device: extract the kit into PYTHONPATH folders")
    u.add_argument("--from", dest="src", default=str(KIT / "carry"), help="the carried folder (default .gpu_kit/carry)")
    u.add_argument("--to", default="/tmp/kit", help="where the folders go (default /tmp/kit)")
    args = ap.parse_args(argv)
    if args.cmd == "build":
        ensure_excluded()
        build(Path(args.kit), args.max_mib)
        return 0
    done = unpack(Path(args.src), Path(args.to))
    to = Path(args.to)
    main_path = os.pathsep.join(str(to / s) for s in SITE_PATH["site_main"])
    print(f"unpacked {', '.join(done)} into {to}")
    print(f"project arms: export PYTHONPATH={main_path}{os.pathsep}$PWD")
    print(f"peers: bench/train_throughput.py ... --peers trl,unsloth --peer-kit {to}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

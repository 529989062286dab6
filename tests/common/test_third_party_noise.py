"""A quiet, honest console: no line asks the user to install a package the project does not need,
and the one third-party deprecation the project causes is filtered; other messages still show."""

from __future__ import annotations

import logging
import re
import subprocess
import sys

from hai_medqa import third_party_noise

INSTALL_LINE = re.compile(r"pip install|please (make sure you )?install|not installed", re.IGNORECASE)


def _record(exc: BaseException) -> logging.LogRecord:
    return logging.LogRecord(third_party_noise.BNB_CPU_LOGGER, logging.WARNING, __file__, 1,
                             third_party_noise.BNB_KERNELS_MESSAGE + ": %s. Please make sure you already "
                             "`pip install kernels`", (exc,), None)


def test_kernels_line_hidden_only_when_the_package_is_missing():
    f = third_party_noise._MissingKernelsPackage()
    missing = ModuleNotFoundError("No module named 'kernels'", name="kernels")
    assert f.filter(_record(missing)) is False
    assert f.filter(_record(RuntimeError("kernel download failed"))) is True  # installed but failing: shown
    other = logging.LogRecord(third_party_noise.BNB_CPU_LOGGER, logging.WARNING, __file__, 1, "something else", (),
                              None)
    assert f.filter(other) is True


def test_liger_optional_backend_lines_hidden_others_kept():
    f = third_party_noise._LigerOptionalBackend()

    def rec(path):
        return logging.LogRecord(third_party_noise.LIGER_REGISTRY_LOGGER, logging.WARNING, __file__, 1,
                                 "Backend impl '%s' for op '%s' could not be imported: %s: %s",
                                 (path, "rope", "ImportError", "Install it with `pip install nvidia-cutlass-dsl`"), None)

    assert f.filter(rec("liger_kernel.ops.backends._cutedsl.rope")) is False
    assert f.filter(rec("liger_kernel.ops.backends._ascend.rope")) is False
    assert f.filter(rec("liger_kernel.ops.rope")) is True  # the Triton kernel the project uses: shown


def test_s_f2_console_asks_to_install_nothing(repo_root, tiny_exaone_dir, sample_jsonl, tmp_path):
    proc = subprocess.run(
        [sys.executable, "S_F2.py", "--config", "configs/tiny_cpu.yaml", "--model", str(tiny_exaone_dir),
         "--train-file", str(sample_jsonl["train"]), "--val-file", str(sample_jsonl["validation"]),
         "--max-eval-samples", "4", "--output-dir", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache"),
         "--max-steps", "2", "--eval-steps", "2", "--tokens-per-micro-batch", "1024"],
        cwd=repo_root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    console = (proc.stdout + proc.stderr).splitlines()
    assert [line for line in console if INSTALL_LINE.search(line)] == []
    assert not [line for line in console if "is_gradient_checkpointing" in line]
    assert any("training completed" in line for line in console)  # the console still reports the run

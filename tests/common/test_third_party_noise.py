"""A quiet, honest console: no line asks the user to install a package the project does not need,
and the one third-party deprecation the project causes is filtered; other messages still show."""

from __future__ import annotations

import logging
import re

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


def test_s_f2_console_asks_to_install_nothing(cli_training_run):
    """The console of a real S_F2.py run (the tiny config with evaluation: conftest's cli_training_run)."""
    console = cli_training_run["console"].splitlines()
    assert [line for line in console if INSTALL_LINE.search(line)] == []
    assert not [line for line in console if "is_gradient_checkpointing" in line]
    assert any("training completed" in line for line in console)  # the console still reports the run

"""Every user-facing error class of the package derives from HaiMedQAError, so a script can catch one
type and print one line; a new stage that forgets it fails here."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import hai_medqa
from hai_medqa.errors import HaiMedQAError

INTERNAL = {"InvalidItem"}  # data.schema: a skip reason carried inside the preprocessor, never shown raw


def _error_classes():
    for info in pkgutil.walk_packages(hai_medqa.__path__, "hai_medqa."):
        if info.name.endswith(("demo", "__main__")):
            continue
        module = importlib.import_module(info.name)
        for name, obj in inspect.getmembers(module, inspect.isclass):
            if obj.__module__ == module.__name__ and issubclass(obj, Exception) and name not in INTERNAL:
                yield f"{module.__name__}.{name}", obj


def test_every_project_error_is_a_haimedqa_error():
    found = dict(_error_classes())
    assert len(found) >= 15  # the stages' errors were really found
    offenders = sorted(name for name, cls in found.items() if not issubclass(cls, HaiMedQAError))
    assert offenders == []


def test_one_class_per_name():
    """Two stages must not each define a `DataError`: one meaning, one class (hai_medqa/errors.py)."""
    by_name: dict[str, list[str]] = {}
    for qualified, _ in _error_classes():
        by_name.setdefault(qualified.rsplit(".", 1)[1], []).append(qualified)
    assert {name: where for name, where in by_name.items() if len(where) > 1} == {}

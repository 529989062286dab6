"""The import picture follows the data's path: a stage imports only itself, the common modules and
earlier stages (data -> model -> train -> merge -> publish -> inference/evaluation), and no production
module imports the fixtures (docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "hai_medqa"
STAGE_ORDER = {"data": 1, "model": 2, "train": 3, "merge": 4, "publish": 5, "inference": 6, "evaluation": 6}
RUNNERS = {"demo.py"}  # runs the whole pipeline's scripts; not a stage


def imported_modules(path: Path) -> list[str]:
    """Absolute ``hai_medqa.*`` modules a file imports (relative imports stay inside a stage)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and not node.level and node.module:
            out.append(node.module)
        elif isinstance(node, ast.Import):
            out.extend(a.name for a in node.names)
    return [m for m in out if m.startswith("hai_medqa.")]


def upward_imports(package: Path = PACKAGE) -> list[str]:
    """``"path -> module"`` for every import against the stage order (empty = the picture holds)."""
    found = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package)
        source = rel.parts[0] if len(rel.parts) > 1 else "common"
        if source == "fixtures" or rel.name in RUNNERS and source == "common":
            continue
        for module in imported_modules(path):
            target = module.split(".")[1]
            if target == "fixtures" or (target in STAGE_ORDER and
                                        (source == "common" or STAGE_ORDER[target] > STAGE_ORDER.get(source, 0))):
                found.append(f"{rel} -> {module}")
    return found


def test_no_stage_imports_a_later_stage_or_the_fixtures():
    assert upward_imports() == []


def test_the_check_sees_an_upward_import(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "x.py").write_text("from hai_medqa.publish.release import make_release\n")
    (tmp_path / "run_folder.py").write_text("from hai_medqa.fixtures.tiny_model import build_tiny_exaone\n")
    (tmp_path / "merge").mkdir()
    (tmp_path / "merge" / "ok.py").write_text("from hai_medqa.model.exaone_layout import EXAONE_TO_LLAMA\n")
    assert upward_imports(tmp_path) == ["run_folder.py -> hai_medqa.fixtures.tiny_model",
                                        "train/x.py -> hai_medqa.publish.release"]

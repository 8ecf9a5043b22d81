"""The shape of the package holds: layers, no import cycles, no private names across modules.

The layer and cycle rules are import-linter contracts in pyproject.toml
(``[tool.importlinter]``); docs/architecture.md explains them. The private-name rule is
checked here with ``ast``: import-linter knows private *modules*, not private names.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "archiver"
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def _lint_imports(project: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--config", str(project / "pyproject.toml")],
        cwd=project,
        env={"PYTHONPATH": str(project), "PATH": str(LINT_IMPORTS.parent)},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_layer_and_cycle_contracts_hold() -> None:
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_a_lower_layer_importing_a_higher_one_breaks_the_contract(tmp_path: Path) -> None:
    shutil.copytree(PACKAGE, tmp_path / "archiver", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    ledger = tmp_path / "archiver" / "source" / "ledger.py"
    ledger.write_text(ledger.read_text() + "\nfrom archiver.engine import recovery  # noqa\n")

    result = _lint_imports(tmp_path)

    assert result.returncode != 0
    assert "archiver.source is not allowed to import archiver.engine" in result.stdout
    assert "archiver.source.ledger -> archiver.engine.recovery" in result.stdout


def _private_imports(path: Path, base: Path = ROOT) -> list[str]:
    """``from archiver.x import _name`` in ``path``: a private name of another module."""
    return [
        f"{path.relative_to(base)}:{node.lineno} imports {alias.name} from {node.module}"
        for node in ast.walk(ast.parse(path.read_text(), str(path)))
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("archiver")
        for alias in node.names
        if alias.name.startswith("_") and not alias.name.startswith("__")
    ]


def test_no_module_imports_a_private_name_of_another() -> None:
    offenders = [line for path in sorted(PACKAGE.rglob("*.py")) for line in _private_imports(path)]
    assert offenders == []


def test_the_private_name_check_finds_one(tmp_path: Path) -> None:
    module = tmp_path / "bad.py"
    module.write_text("from archiver.source.engine import _redact\n")
    found = _private_imports(module, tmp_path)
    assert found == ["bad.py:1 imports _redact from archiver.source.engine"]

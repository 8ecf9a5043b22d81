"""The README, --help and config.example.toml stay true to the code."""

from __future__ import annotations

import re
from pathlib import Path

import typer.main
from typer.testing import CliRunner

from archiver.cli.app import app

ROOT = Path(__file__).resolve().parent.parent


def test_every_command_has_help_and_is_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    commands = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    assert {"run", "recover", "ls", "verify", "plan", "doctor"} <= set(commands)
    for name in commands:
        assert f"`archiver {name}`" in readme, f"README does not document archiver {name}"
        result = CliRunner().invoke(app, [name, "--help"])
        assert result.exit_code == 0 and "--config" in result.stdout


def test_ci_runs_exactly_the_readmes_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in readme
    commands = [line for line in ci.splitlines() if line and not line.startswith(("#", "set "))]
    assert commands[-1] == "make test"


def test_every_option_of_run_is_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    run = typer.main.get_command(app).commands["run"]  # type: ignore[attr-defined]
    for option in run.params:
        for name in option.opts:
            if name.startswith("--") and name not in ("--help", "--config", "--yes"):
                assert f"`{name}" in readme, f"README does not document archiver run {name}"


def test_the_readme_links_only_files_that_exist() -> None:
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(((?:docs|config)[^)#]*)\)", readme)
    assert "docs/deploy/prefect_flow.py" in links
    for link in links:
        assert (ROOT / link).exists(), f"README links {link}, which does not exist"


def _module_paragraphs(page: str) -> dict[str, str]:
    """The paragraphs of "The modules", keyed by the folder they open with (`archiver/cli/`)."""
    modules = page.split("## The modules", 1)[1]
    paragraphs: dict[str, str] = {}
    for paragraph in modules.split("\n\n"):
        opening = re.search(r"\(`(archiver/[\w/]*)`\):", paragraph)
        if opening:
            paragraphs[opening.group(1)] = paragraph
    return paragraphs


def test_the_architecture_page_names_every_module_and_only_real_files() -> None:
    page = (ROOT / "docs" / "architecture.md").read_text()
    paragraphs = _module_paragraphs(page)
    package = ROOT / "archiver"
    for module in sorted(package.rglob("*.py")):
        if module.name == "__init__.py":
            continue
        folder = f"{module.parent.relative_to(ROOT)}/"
        assert f"`{module.name}`" in paragraphs.get(folder, ""), (
            f"docs/architecture.md does not name {module.relative_to(ROOT)} under {folder}"
        )
    for path in re.findall(
        r"`((?:archiver|engine|source|archive|cli|docs|tests)/[\w/.]+\.\w+)", page
    ):
        assert (ROOT / path).exists() or (package / path).exists(), (
            f"docs/architecture.md names {path}, which does not exist"
        )

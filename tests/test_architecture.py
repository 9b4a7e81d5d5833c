"""The architecture's rules, enforced: import-linter's contracts (pyproject.toml) hold, and break when broken."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
        "sys.exit(lint_imports_command(['--no-cache']))"]


def _lint(cwd: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    pytest.importorskip("importlinter")
    env = {"PATH": "/usr/bin:/bin", **({"PYTHONPATH": str(pythonpath)} if pythonpath else {})}
    return subprocess.run(LINT, cwd=cwd, capture_output=True, text=True, env=env, timeout=300)


def test_contracts_are_kept():
    r = _lint(ROOT)
    assert r.returncode == 0 and "0 broken" in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize("module,line,broken", [
    ("model.py", "from edge_awq.commands import chat", "the model knows no command, server or screen"),
    ("plan.py", "from edge_awq.backends import numba", "plan imports no backend"),
    ("formats/eawq.py", "import numba", "the file formats import no kernel"),
    ("pack.py", "import torch", "the device side never imports torch"),
    ("config.py", "from edge_awq import model", "layers, from the commands down to the configuration"),
])
def test_a_planted_import_breaks_its_contract(tmp_path, module, line, broken):
    shutil.copytree(ROOT / "edge_awq", tmp_path / "edge_awq", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    with open(tmp_path / "edge_awq" / module, "a") as f:
        f.write(f"\n{line}  # planted by the test\n")
    r = _lint(tmp_path, pythonpath=tmp_path)
    assert r.returncode != 0 and f"{broken}" in r.stdout, r.stdout + r.stderr
    assert any(x.endswith("BROKEN") and x.startswith(broken.split(",")[0]) for x in r.stdout.splitlines()), r.stdout


def test_the_device_side_never_names_the_offline_package():
    """edge_awq.offline lives outside edge_awq/ (offline/), beyond import-linter's graph: checked here."""
    hits = []
    for path in (ROOT / "edge_awq").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            hits += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.startswith("edge_awq.offline")]
    assert hits == []


def test_device_side_modules_stay_small():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in (ROOT / "edge_awq").rglob("*.py")}
    assert {k: v for k, v in sizes.items() if v > 520} == {}

"""deploy/: the systemd unit verifies, rates OK or better, and holds to what serve needs."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
UNIT = DEPLOY / "edge-awq.service"
needs_systemd = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")


def _installed_unit(tmp_path: Path) -> Path:
    """The unit as install.sh installs it, with ExecStart at this environment's edge-awq."""
    exe = Path(sys.executable).parent / "edge-awq"
    if not exe.exists():
        pytest.skip(f"no edge-awq script beside {sys.executable}")
    out = tmp_path / "edge-awq.service"
    out.write_text(UNIT.read_text().replace("/opt/edge-awq/venv/bin/edge-awq", str(exe)))
    return out


@needs_systemd
def test_unit_verifies(tmp_path):
    r = subprocess.run(["systemd-analyze", "verify", str(_installed_unit(tmp_path))], capture_output=True, text=True)
    assert r.returncode == 0 and "edge-awq.service" not in r.stderr, r.stderr


@needs_systemd
def test_unit_rates_ok_or_better(tmp_path):
    r = subprocess.run(["systemd-analyze", "security", "--offline=true", str(_installed_unit(tmp_path))],
                       capture_output=True, text=True)
    m = re.search(r"Overall exposure level for edge-awq.service: ([\d.]+) (\w+)", r.stdout + r.stderr)
    assert m, r.stdout[-1000:] + r.stderr
    assert m.group(2) in ("SAFE", "OK") and float(m.group(1)) < 2.0, m.group(0)


def test_unit_is_what_serve_needs():
    u = UNIT.read_text()
    for line in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "DynamicUser=yes", "ProtectSystem=strict",
                 "ProtectHome=yes", "PrivateTmp=yes", "NoNewPrivileges=yes", "CapabilityBoundingSet=\n",
                 "IPAddressAllow=localhost", "NUMBA_CACHE_DIR=/var/cache/edge-awq"):
        assert line in u, line
    assert not re.search(r"^MemoryDenyWriteExecute=yes", u, re.M)  # numba's JIT needs W+X memory
    stop = int(re.search(r"^TimeoutStopSec=(\d+)", u, re.M).group(1))
    assert stop > 30  # longer than serve's default --drain-timeout, so the drain is not cut by SIGKILL
    env = (DEPLOY / "edge-awq.env.example").read_text()
    for var in re.findall(r"\$\{?(EDGE_AWQ_\w+)", u):
        assert re.search(rf"^{var}=", env, re.M), var


def test_install_script_parses_and_refuses_bad_use(tmp_path):
    script = DEPLOY / "install.sh"
    assert subprocess.run(["sh", "-n", str(script)]).returncode == 0
    r = subprocess.run(["sh", str(script)], capture_output=True, text=True)
    assert r.returncode == 2 and "usage" in r.stderr
    r = subprocess.run(["sh", str(script), str(tmp_path / "missing.eawq"), "--bogus"], capture_output=True, text=True)
    assert r.returncode == 2


@needs_systemd
def test_install_stages_a_service(tmp_path):
    """install.sh --root: the layout, the settings, MemoryMax from the plan, and a unit that verifies."""
    model = Path(__file__).parent / "golden" / "tiny.eawq"
    root = tmp_path / "root"
    r = subprocess.run(["sh", str(DEPLOY / "install.sh"), str(model), "--ctx", "64", "--root", str(root)],
                       capture_output=True, text=True, env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
                                                            "EDGE_AWQ_VENV": sys.prefix, "HOME": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert (root / "opt/edge-awq/models/tiny.eawq").read_bytes() == model.read_bytes()
    env = (root / "etc/edge-awq/edge-awq.env").read_text()
    assert "EDGE_AWQ_MODEL=/opt/edge-awq/models/tiny.eawq" in env and "EDGE_AWQ_ARGS=--ctx 64" in env
    import json

    total = json.loads((root / "etc/edge-awq/plan.json").read_text())["total"]
    conf = (root / "etc/systemd/system/edge-awq.service.d/memory.conf").read_text()
    assert f"MemoryMax={total * 5 // 4 // 1048576 + 1}M" in conf
    assert (root / "etc/systemd/system/edge-awq.service").read_text() == UNIT.read_text()
    r = subprocess.run(["sh", str(DEPLOY / "install.sh"), str(model), "--ctx", "many", "--root", str(root)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "--ctx many: not a number" in r.stderr

"""Thread-pool settings: set before the pools start, never over what the user chose."""

import json
import os
import subprocess
import sys

from edge_awq.backends import threads


def _configured(env: dict) -> dict:
    code = "import json; from edge_awq.backends import threads; print(json.dumps(threads.configure()))"
    clean = {k: v for k, v in os.environ.items() if k not in threads.DEFAULTS}
    out = subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out)


def test_defaults_fill_what_is_unset():
    assert _configured({}) == threads.DEFAULTS
    assert threads.DEFAULTS["OMP_WAIT_POLICY"] == "PASSIVE" and int(threads.DEFAULTS["GOMP_SPINCOUNT"]) > 0


def test_user_settings_win():
    got = _configured({"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "0"})
    assert got["OMP_WAIT_POLICY"] == "ACTIVE" and got["GOMP_SPINCOUNT"] == "0"
    assert got["OPENBLAS_THREAD_TIMEOUT"] == threads.DEFAULTS["OPENBLAS_THREAD_TIMEOUT"]


def test_the_cli_configures_before_numpy_starts():
    """numpy (OpenBLAS) must not be imported before ``configure`` runs, or its setting is ignored."""
    code = ("import sys, os; import edge_awq.cli; "
            "print('numpy' in sys.modules, os.environ.get('OPENBLAS_THREAD_TIMEOUT'), os.environ.get('GOMP_SPINCOUNT'))")
    clean = {k: v for k, v in os.environ.items() if k not in threads.DEFAULTS}
    out = subprocess.run([sys.executable, "-c", code], env=clean, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", threads.DEFAULTS["OPENBLAS_THREAD_TIMEOUT"], threads.DEFAULTS["GOMP_SPINCOUNT"]]

"""The emulated aarch64 checks of tests/test_aarch64.py, run beside the rest of the suite.

Each check is tests/aarch64_check.py in the aarch64 Python under qemu (minutes of single-threaded
emulation, mostly numba compiling its kernels). Run one after another they took most of the suite's
time while the rest of it, mostly single-threaded too, left the second core idle. So when those tests
are selected, conftest.py starts this driver as the session begins, at the lowest CPU priority:

    python -m tests.aarch64_runs DIR CHECK...

It exports stories260K (4-bit RTN, per-channel groups: 64 and 172 wide, an int8 head), tokenizes the
prompt, starts every named check at once and writes, as each ends, DIR/CHECK.result.json: its exit code,
the end of its stderr and what it reported. The tests are collected last and wait for their file
(``wait``); the host's own side of each comparison runs in the test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

CHECK = Path(__file__).with_name("aarch64_check.py")
PROMPT = "Once upon a time, a little dog"
# check -> (activations, greedy tokens, environment): emulation reports no CPU features, so the CPU is named
# (NUMBA_CPU_NAME) and the instruction set forced (EDGE_AWQ_ISA); "float" is what emulation finds by itself.
CHECKS = {
    "float": ("int16", 32, {}),
    "sdot": ("int8", 32, {"NUMBA_CPU_NAME": "cortex-a76", "EDGE_AWQ_ISA": "sdot"}),
    "i8mm": ("int8", 32, {"NUMBA_CPU_NAME": "neoverse-v1", "EDGE_AWQ_ISA": "i8mm"}),
    "neon": ("int8", 0, {"NUMBA_CPU_NAME": "cortex-a53", "EDGE_AWQ_ISA": "neon"}),
}
CHECK_TIMEOUT = 3600  # seconds of wall time for one check, sharing the CPU with the suite and the others
SETUP = "setup.json"


def result_path(out: Path, name: str) -> Path:
    return out / f"{name}.result.json"


def _export(out: Path) -> tuple[Path, list[int]]:
    from edge_awq.formats.load import open_source
    from tests.conftest import SHAKESPEARE, STORIES

    model = out / "stories.eawq"
    subprocess.run([sys.executable, "-m", "edge_awq", "export", str(STORIES), "--calib", str(SHAKESPEARE),
                    "--method", "rtn", "--group-size", "channel", "--n-samples", "4", "--seqlen", "128",
                    "-o", str(model)], check=True, capture_output=True)
    return model, open_source(model).tokenizer().encode(PROMPT, bos=True)


def run(out: Path, names: list[str], python: str) -> None:
    try:
        model, prompt = _export(out)
    except subprocess.CalledProcessError as e:
        for name in names:
            _write(result_path(out, name), {"returncode": -1, "stderr": f"export failed: {e.stderr[-3000:]}"})
        return
    _write(out / SETUP, {"model": str(model), "prompt": prompt})
    procs = {}
    for name in names:
        activations, tokens, env = CHECKS[name]
        cmd = [python, str(CHECK), str(model), json.dumps(prompt if tokens else [1]), str(out / f"{name}.json"),
               activations, str(tokens)]
        env = {**os.environ, **env, "NUMBA_CACHE_DIR": str(out / f"numba-{name}")}
        with open(out / f"{name}.stderr", "w") as err:
            procs[name] = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + CHECK_TIMEOUT
    while procs:
        for name, p in list(procs.items()):
            if p.poll() is None and time.monotonic() < deadline:
                continue
            timed_out = p.poll() is None
            if timed_out:
                p.kill()
                p.wait()
            err = (out / f"{name}.stderr").read_text(errors="replace")[-3000:]
            if timed_out:
                err += f"\ntimed out after {CHECK_TIMEOUT} s"
            report = out / f"{name}.json"
            got = json.loads(report.read_text()) if p.returncode == 0 and report.is_file() else None
            _write(result_path(out, name), {"returncode": p.returncode, "stderr": err, "got": got})
            del procs[name]
        time.sleep(1)


def _write(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj))
    tmp.replace(path)  # a reader never sees half a result


def wait(out: Path, name: str, proc: subprocess.Popen | None, limit: float = CHECK_TIMEOUT + 600) -> dict:
    """The result of check ``name``: waits for its file while the driver runs."""
    path, t0 = result_path(out, name), time.monotonic()
    while not path.is_file():
        if proc is not None and proc.poll() is not None and not path.is_file():
            raise RuntimeError(f"the aarch64 driver ended (exit {proc.returncode}) without a result for {name}")
        if time.monotonic() - t0 > limit:
            raise TimeoutError(f"no result for the aarch64 check {name} after {limit:.0f} s")
        time.sleep(2)
    res = json.loads(path.read_text())
    setup = out / SETUP
    res["setup"] = json.loads(setup.read_text()) if setup.is_file() else None
    return res


def _lowest_priority() -> None:
    """The suite's own tests come first; the emulation takes the CPU they leave. The driver runs in a session of
    its own (so that it can be stopped as a group), and where the kernel groups each session's tasks
    (autogroup), a task's nice value only weighs within its session: the group's own nice is set too. Without
    it the emulation took half the machine, and torch's two threads on the other half ran the export tests
    ten times slower (test_search_speed.py: 54 s alone, 640 s beside the emulation)."""
    os.nice(19)  # inherited by the emulated checks
    try:
        Path("/proc/self/autogroup").write_text("19")
    except OSError:  # no autogroup here: the nice value above is enough
        pass


if __name__ == "__main__":
    _lowest_priority()
    run(Path(sys.argv[1]), sys.argv[2:], os.environ["EDGE_AWQ_AARCH64_PYTHON"])

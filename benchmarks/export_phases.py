"""Where ``edge-awq export`` holds its memory: resident memory sampled through one export, by phase.

    python benchmarks/export_phases.py EXPORT_ARGS...   # e.g. MODEL --calib TEXT -o out.eawq --n-samples 2

Runs the export in this process with the workstation side's steps wrapped (layer read and conversion,
input recording, scale search and its trials, clip search, packing, dequantization, the layer's forward
passes, the sensitivity pass), a thread reading this process's resident set every 10 ms. Prints, in
order, each stretch of time spent in one step (the innermost wrapped call, with its two callers): its
start, the highest and the last resident memory seen in it; then the peak (VmHWM). Memory of a
step is what the process holds while it runs, so the step where the peak falls names the copies to look at.
"""

import functools
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_awq.offline.heap import resident  # noqa: E402

STEPS = {
    "edge_awq.offline.layerwise": ("to_torch", "read_layer", "record_inputs", "search_layer", "search_scales",
                                   "search_clip", "apply_clip", "pack_linear", "unpack_linear", "block",
                                   "rtn_layer", "quantize_layer"),
    "edge_awq.offline.sensitivity": ("layer_errors", "search_scales", "search_clip", "to_torch", "read_layer",
                                     "record_inputs"),
    "edge_awq.offline.search": ("scaled_trial",),
}


class Sampler:
    def __init__(self):
        self.stack = ["main"]
        self.stretches = []  # [step, highest, last, start time]

    def run(self):
        while True:
            r, step = resident(), "/".join(self.stack[-3:])
            if not self.stretches or self.stretches[-1][0] != step:
                self.stretches.append([step, r, r, time.perf_counter()])
            last = self.stretches[-1]
            last[1], last[2] = max(last[1], r), r
            time.sleep(0.01)

    def wrap(self, module, name: str, label: str):
        f = getattr(module, name)

        @functools.wraps(f)
        def step(*args, **kwargs):
            self.stack.append(label)
            try:
                return f(*args, **kwargs)
            finally:
                self.stack.pop()

        setattr(module, name, step)


def main():
    import importlib

    from edge_awq.cli import main as cli

    sampler = Sampler()
    for mod, names in STEPS.items():
        module = importlib.import_module(mod)
        prefix = "sensitivity." if mod.endswith("sensitivity") else ""
        for n in names:
            sampler.wrap(module, n, prefix + n)
    threading.Thread(target=sampler.run, daemon=True).start()
    sys.argv = ["edge-awq", "export", *sys.argv[1:]]
    try:
        rc = cli()
    finally:
        t0 = sampler.stretches[0][3]
        print("| start (s) | step | highest (GiB) | last (GiB) |\n|---|---|---|---|")
        for step, high, last, t in sampler.stretches:
            print(f"| {t - t0:.1f} | {step} | {high / 2**30:.2f} | {last / 2**30:.2f} |")
        hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM")][0]
        print(f"\npeak (VmHWM): {int(hwm.split()[1]) / 2**20:.2f} GiB")
    return rc


if __name__ == "__main__":
    sys.exit(main())

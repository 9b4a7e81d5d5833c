"""Progress display and the closing summary of ``edge-awq export``."""

from __future__ import annotations

from pathlib import Path

from edge_awq.formats.eawq import stored_bits_per_weight
from edge_awq.formats.tensorfile import SafetensorsFile


class Progress:
    """A rich progress bar over layers on stderr, with the last layer's losses (shown from ``start``)."""

    def __init__(self):
        self._bar = None

    def start(self, n_layers: int, method: str) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeRemainingColumn

        if self._bar is not None:  # a pass before this one (the sensitivity pass) leaves its bar
            self._bar.__exit__(None, None, None)
        self._bar = Bar(TextColumn(f"{method} layers"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                        TextColumn("{task.fields[phase]}  {task.fields[last]}"), console=Console(stderr=True),
                        transient=True)
        self._bar.__enter__()
        self._task = self._bar.add_task("export", total=n_layers, last="", phase="")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._bar.__exit__(*exc) if self._bar is not None else False

    def phase(self, index: int, name: str) -> None:
        self._bar.update(self._task, phase=f"layer {index}: {name}")

    def advance(self, index: int) -> None:
        self._bar.update(self._task, advance=1, last=f"layer {index} measured")

    def layer_done(self, rep) -> None:
        self._bar.update(self._task, advance=1, last=f"layer {rep.index}: loss {rep.loss:.3g} (rtn {rep.loss_rtn:.3g})")


def summary(path: Path, a, qa, reports, t_calib: float, t_total: float, allocation: dict | None = None, *,
            n_blocks: int) -> dict:
    """A dict of the export's figures, with a human-readable ``text``; allocation: a mixed-precision
    export's choice (``export._allocate``); n_blocks: the calibration blocks the layers ran on."""
    phases = {"calibrate": t_calib, **(allocation or {}).get("seconds", {})}
    for r in reports:
        for k, v in r.seconds.items():
            phases[k] = phases.get(k, 0.0) + v
    size = path.stat().st_size
    n_params = a.n_params
    gs_note = "per channel" if qa.group_size == "channel" else f"group {qa.group_size}"
    bpw = stored_bits_per_weight({k: t.end - t.begin for k, t in SafetensorsFile(path).tensors.items()}, a)
    what = f"W{qa.bits} {gs_note}" if not qa.formats else "mixed " + ", ".join(
        f"{k} {v:.0%}" for k, v in allocation["mix"].items())
    lines = [f"wrote {path} ({size / 1e6:,.1f} MB): {qa.method.upper()} {what}, "
             f"{bpw:.3f} bits per quantized weight, {8 * size / n_params:.2f} bits per parameter overall"]
    if allocation is not None:
        asked = (f"--budget {allocation['budget_bits_per_weight']:g} bits per weight"
                 if "budget_bits_per_weight" in allocation else
                 f"--fit {allocation['fit']} at --ctx {allocation['ctx']} (KV {allocation['kv_dtype']})")
        lines.append(f"allocation: {asked}: {allocation['budget_bytes']:,} bytes for the linears, "
                     f"{allocation['bytes']:,} used; summed relative error {allocation['predicted_error']:.4g} "
                     f"(sensitivity {allocation['sensitivity']})")
    lines.append("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in phases.items()) + f"; total {t_total:.1f}s")
    if qa.method == "awq" and 0 < qa.search_blocks < n_blocks:  # with a subset (search_subset takes all at n)
        lines.append(f"(RTN MSE measured on the {qa.search_blocks} judged calibration blocks, output MSE on all)")
    lines.append("layer  output MSE   RTN MSE    ratio   " + ("α per scale group" if qa.method == "awq" else ""))
    for r in reports:
        alphas = " ".join(f"{s.prev}:{s.ratio:.2f}" for s in r.scales)
        ratio = r.loss / r.loss_rtn if r.loss_rtn > 0 else 1.0
        lines.append(f"{r.index:5d}  {r.loss:10.4g}  {r.loss_rtn:9.4g}  {ratio:6.3f}   {alphas}")
    return {
        "output": str(path), "bytes": size, "bits_per_weight": bpw, "bits_per_parameter": 8 * size / n_params,
        "seconds": {**phases, "total": t_total}, "method": qa.method, "bits": qa.bits, "group_size": qa.group_size,
        "allocation": allocation,
        "layers": [{"index": r.index, "loss": r.loss, "loss_rtn": r.loss_rtn,
                    "alphas": {s.prev: s.ratio for s in r.scales}} for r in reports],
        "text": "\n".join(lines),
    }


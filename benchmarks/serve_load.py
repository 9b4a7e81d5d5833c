"""A bounded loopback load on `edge-awq serve`: N chat requests from C concurrent clients.

Starts the server on a free loopback port, waits for /ready, notes its resident memory, runs the
load with streaming requests (time to first token = first content chunk), notes the memory again,
stops the server with SIGTERM, and prints the README's table (and --json).

    python benchmarks/serve_load.py MODEL.eawq [--requests 200] [--clients 8] [--max-tokens 32] [--big-prompts 20]

--big-prompts N adds N requests whose prompt fills the body limit (1 MiB), sent while the load runs; the
server's resident memory is sampled every 0.1 s throughout and its peak set beside the memory plan
(``edge-awq plan`` at the same context) and the MemoryMax that ``deploy/install.sh`` derives from it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter

import httpx

QUESTIONS = [
    "What is the capital of France?", "Give me three tips for sleeping better.", "What is a robot?",
    "Write a haiku about the sea.", "How do plants make food?", "Why is the sky blue?",
    "Name three primary colors.", "What does a battery do?", "Tell me a fun fact about cats.",
    "How many legs does a spider have?", "What is the boiling point of water?", "Describe a sunny day.",
]


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def start(model: str, port: int, extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "edge_awq", "serve", model, "--port", str(port), "--model-name", "m", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(f"/tmp/serve_load_{port}.log", "w"))
    for _ in range(1200):
        if proc.poll() is not None:
            raise SystemExit(f"server exited {proc.returncode}; see /tmp/serve_load_{port}.log")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit("server not ready in 10 minutes")


def one_request(url: str, rng: random.Random, max_tokens: int) -> dict:
    body = {"model": "m", "messages": [{"role": "user", "content": rng.choice(QUESTIONS)}], "max_tokens": max_tokens,
            "temperature": 0.7, "seed": rng.randrange(1 << 30), "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
        if r.status_code != 200:
            r.read()
            return {"status": r.status_code, "retry_after": r.headers.get("retry-after")}
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            ev = json.loads(line[6:])
            if ev.get("usage"):
                tokens = ev["usage"]["completion_tokens"]
            if ttft is None and any(c["delta"].get("content") for c in ev["choices"]):
                ttft = time.perf_counter() - t0
    total = time.perf_counter() - t0
    return {"status": 200, "ttft": ttft, "total": total, "tokens": tokens}


def big_request(url: str, i: int) -> dict:
    """A chat request whose prompt fills a body of about 1 MiB (refused: it cannot fit the context)."""
    content = ("word " * 200_000 + str(i))[: (1 << 20) - 200]
    r = httpx.post(url + "/v1/chat/completions", json={"model": "m", "max_tokens": 8,
                                                        "messages": [{"role": "user", "content": content}]}, timeout=600)
    return {"status": r.status_code, "big": True}


def plan_total_mib(model: str, server_args: list[str]) -> float:
    ctx = server_args[server_args.index("--ctx") + 1] if "--ctx" in server_args else "2048"
    r = subprocess.run([sys.executable, "-m", "edge_awq", "plan", model, "--memory", "1TiB", "--ctx", ctx, "--json"],
                       capture_output=True, text=True)
    return json.loads(r.stdout)["total"] / 2**20


def served_ttft(log_path: str) -> list[float]:
    """Time to first token after leaving the queue (ttft - queued), from the server's request lines."""
    out = []
    for line in open(log_path):
        m = re.search(r" 200 in=\d+ out=\d+ ttft=([\d.]+)s queued=([\d.]+)s", line)
        if m:
            out.append(float(m.group(1)) - float(m.group(2)))
    return out


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--big-prompts", type=int, default=0, help="requests with a prompt at the body limit")
    ap.add_argument("--server-args", default="--ctx 1024 --queue-size 8", help="extra flags of edge-awq serve")
    ap.add_argument("--json", default=None, help="also write the results here")
    a = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    proc = start(a.model, port, a.server_args.split())
    time.sleep(2)
    before = rss_mib(proc.pid)
    results: list[dict] = []
    todo = iter(range(a.requests))
    lock = threading.Lock()

    def client(i: int) -> None:
        rng = random.Random(i)
        while True:
            with lock:
                if next(todo, None) is None:
                    return
            r = one_request(url, rng, a.max_tokens)
            with lock:
                results.append(r)
            if r["status"] == 503:  # the designed answer to a full queue: wait as told
                time.sleep(float(r["retry_after"] or 1))

    peak, sampling = [before], threading.Event()

    def sample() -> None:
        while not sampling.wait(0.1):
            peak.append(rss_mib(proc.pid))

    def big() -> None:
        for i in range(a.big_prompts):
            r = big_request(url, i)
            with lock:
                results.append(r)

    t0 = time.perf_counter()
    sampler = threading.Thread(target=sample)
    sampler.start()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(a.clients)] + [threading.Thread(target=big)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    time.sleep(2)
    after = rss_mib(proc.pid)
    sampling.set()
    sampler.join()
    plan = plan_total_mib(a.model, a.server_args.split())
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=120)
    big = [r for r in results if r.get("big")]
    results = [r for r in results if not r.get("big")]
    ok = [r for r in results if r["status"] == 200]
    served = served_ttft(f"/tmp/serve_load_{port}.log")
    statuses = Counter(r["status"] for r in results)
    out = {
        "model": os.path.basename(a.model), "requests": len(results), "clients": a.clients,
        "max_tokens": a.max_tokens, "statuses": dict(statuses), "wall_s": wall,
        "ttft_p50_s": pct([r["ttft"] for r in ok if r["ttft"]], 50), "ttft_p95_s": pct([r["ttft"] for r in ok if r["ttft"]], 95),
        "served_ttft_p50_s": pct(served, 50), "served_ttft_p95_s": pct(served, 95),
        "decode_tokens_per_s_p50": pct([r["tokens"] / (r["total"] - r["ttft"]) for r in ok if r["ttft"] and r["tokens"] > 1], 50),
        "aggregate_tokens_per_s": sum(r["tokens"] for r in ok) / wall,
        "rss_before_mib": before, "rss_after_mib": after, "rss_ratio": after / before, "exit_code": code,
        "big_prompts": dict(Counter(r["status"] for r in big)), "rss_peak_mib": max(peak), "plan_total_mib": plan,
        "memory_max_mib": plan * 1.25,  # deploy/install.sh: the plan's total plus a quarter
    }
    print(json.dumps(out, indent=1))
    print("\n| requests | clients | statuses | TTFT p50 / p95 | of it, after the queue p50 / p95 | decode tok/s per request (p50) "
          "| tokens/s overall | RSS before → after |")
    print("|---|---|---|---|---|---|---|---|")
    st = ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items()))
    print(f"| {out['requests']} | {a.clients} | {st} | {out['ttft_p50_s']:.2f} / {out['ttft_p95_s']:.2f} s | "
          f"{out['served_ttft_p50_s']:.2f} / {out['served_ttft_p95_s']:.2f} s | "
          f"{out['decode_tokens_per_s_p50']:.1f} | {out['aggregate_tokens_per_s']:.1f} | "
          f"{before:.0f} → {after:.0f} MiB ({out['rss_ratio']:.3f}×) |")
    if a.big_prompts:
        print(f"\n{a.big_prompts} prompts at the body limit: {out['big_prompts']}; resident memory peak "
              f"{out['rss_peak_mib']:.0f} MiB, plan {plan:.0f} MiB ({out['rss_peak_mib'] - plan:+.0f} MiB), MemoryMax "
              f"{out['memory_max_mib']:.0f} MiB")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    bad = [s for s in statuses if s not in (200, 503)]
    return 1 if bad or code != 0 or abs(out["rss_ratio"] - 1) > 0.05 or out["rss_peak_mib"] > out["memory_max_mib"] else 0


if __name__ == "__main__":
    sys.exit(main())

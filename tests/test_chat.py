"""edge-awq chat driven as a person would, through a pseudo-terminal."""

import os
import pty
import re
import select
import subprocess

import pytest
import sys
import time



class Terminal:
    """A child process on a pseudo-terminal, with expect-style reads."""

    def __init__(self, argv):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the pty is its controlling terminal, so ^C becomes SIGINT
            os.environ["COLUMNS"] = "200"
            os.execv(sys.executable, [sys.executable, *argv])
        self.seen = ""

    def expect(self, pattern: str, timeout: float = 120) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            m = re.search(pattern, self.seen)
            if m:
                before, self.seen = self.seen[: m.end()], self.seen[m.end():]
                return before
            r, _, _ = select.select([self.fd], [], [], 0.5)
            if r:
                try:
                    self.seen += os.read(self.fd, 4096).decode("utf-8", "replace")
                except OSError:
                    break
        raise AssertionError(f"never saw {pattern!r}; screen: {self.seen[-2000:]!r}")

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def wait(self, timeout: float = 30) -> int:
        deadline = time.time() + timeout
        while time.time() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            try:
                os.read(self.fd, 4096)
            except OSError:
                pass
            time.sleep(0.1)
        os.kill(self.pid, 9)
        raise AssertionError("the chat did not exit")


@pytest.mark.long
def test_chat_session_in_a_terminal(smollm2):
    t = Terminal(["-m", "edge_awq", "chat", str(smollm2), "--max-new-tokens", "200", "--ctx", "1024", "--temperature", "0"])
    t.expect(r"> ")
    t.send("What is the capital of France?\r")
    answer = t.expect(r"\n> ")
    assert "Paris" in answer
    t.send("And of Italy?\r")
    assert "Rome" in t.expect(r"\n> ")  # the first exchange is remembered
    t.send("/stats\r")
    stats = t.expect(r"\n> ")
    assert re.search(r"tokens at [\d.]+ tokens/s", stats) and "context used" in stats
    t.send("Write a very long story about a dragon who loves to bake bread.\r")
    t.expect(r"bread\.\r\n")  # the terminal's echo of the question
    t.expect(r"[A-Za-z]{3,} [A-Za-z]{3,}")  # the answer has started
    t.send("\x03")  # Ctrl-C stops the answer, not the program
    assert "[stopped]" in t.expect(r"\n> ")
    t.send("/reset\r")
    assert "[conversation cleared]" in t.expect(r"\n> ")
    t.send("\x04")  # Ctrl-D exits
    assert t.wait() == 0


def test_prompt_mode_prints_answer_and_exits_zero(smollm2):
    r = subprocess.run([sys.executable, "-m", "edge_awq", "chat", str(smollm2), "--prompt",
                        "What is the capital of France?", "--backend", "auto", "--temperature", "0"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and "Paris" in r.stdout
    said = re.search(r"\[backend: (\w+) \((.*)\)\]", r.stderr)  # auto says which and why: cuda on a Jetson
    assert said and (said.group(1) == "cuda" or (said.group(1) == "numba" and said.group(2).startswith("no cuda: ")))


def test_backend_unknown_is_one_line(stories_path):
    r = subprocess.run([sys.executable, "-m", "edge_awq", "chat", str(stories_path), "--prompt", "hi", "--backend",
                        "tpu"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().endswith("use cuda, numba, reference or auto")


@pytest.mark.long
def test_int8_kv_cache_answers_the_same(smollm2):
    answers = []
    for kv in ("fp16", "int8"):
        r = subprocess.run([sys.executable, "-m", "edge_awq", "chat", str(smollm2), "--prompt",
                            "What is the capital of France?", "--backend", "numba", "--kv-dtype", kv,
                            "--max-new-tokens", "12", "--temperature", "0"], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        answers.append(r.stdout)
    assert "Paris" in answers[1] and answers[0].split()[:5] == answers[1].split()[:5]


def test_default_sampling_does_not_loop(smollm2):
    """Greedy decoding (the old default) answered this by repeating one phrase until --max-new-tokens ran out; the
    defaults now sample as a conversation wants (the model's generation config, else temperature 0.7, top-k 40,
    top-p 0.9, repetition penalty 1.1)."""
    r = subprocess.run([sys.executable, "-m", "edge_awq", "chat", str(smollm2), "--prompt",
                        "Give me three tips for keeping a robot vacuum running well.", "--backend", "numba",
                        "--max-new-tokens", "160", "--seed", "1"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    words = r.stdout.split()
    windows = [" ".join(words[i : i + 6]) for i in range(len(words) - 5)]
    assert len(words) >= 20 and max(map(windows.count, windows)) <= 2, r.stdout

"""Helpers shared by the server tests: constants, health waiting, SSE parsing, and the scripted backend."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch

from qwenkit import QWenTokenizer

API_KEY = "test-key-0123456789"
MODEL = "tiny"
MAX_LEN = 1024
CONCURRENCY = 4
QUEUE = 4
ALLOWED_ORIGIN = "http://allowed.example"
START_TIMEOUT = 90.0


@dataclass
class Running:
    url: str
    log: Path | None = None
    proc: subprocess.Popen[bytes] | None = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen[bytes] | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text() if log else ''}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"server at {url} not healthy after {START_TIMEOUT}s")


def sse_data(text: str) -> list[str]:
    """The `data:` payloads of an SSE body, in order (each event is one `data:` line and a blank line)."""
    events = [e for e in text.split("\n\n") if e.strip()]
    out = []
    for event in events:
        assert event.startswith("data: ") and "\n" not in event, f"malformed SSE event {event!r}"
        out.append(event[len("data: ") :])
    return out


# ---- the scripted backend ---------------------------------------------------------------------------------------

SCRIPT = re.compile(r"SCRIPT(\[[0-9, ]*\])")


class ScriptedBackend:
    """A Backend (see qwenkit.server.backend) whose logits force a token sequence written into the prompt.

    A prompt containing `SCRIPT[id, id, ...]` (the last such marker) makes the slot produce exactly those ids and
    then `<|im_end|>`; prompts without one produce `<|im_end|>` at once. The forced id gets logit 100, all others
    0, so sampling at any temperature (and with any repetition penalty) picks it. `delay` slows every decode step.
    """

    def __init__(self, tokenizer: QWenTokenizer, max_slots: int, max_len: int, delay: float = 0.0) -> None:
        self.tokenizer = tokenizer
        self.max_slots = max_slots
        self.max_len = max_len
        self.vocab_size = 151936
        self.device = torch.device("cpu")
        self.delay = delay
        self._prompts: dict[int, list[int]] = {}
        self._scripts: dict[int, list[int]] = {}

    def ntk_alpha(self, prompt_len: int) -> float:
        return 1.0

    def _forced(self, slot: int, generated: int) -> torch.Tensor:
        script = self._scripts.get(slot, [])
        token = script[generated] if 0 <= generated < len(script) else self.tokenizer.im_end_id
        logits = torch.zeros(self.vocab_size)
        logits[token] = 100.0
        return logits

    def prefill(self, slot: int, ids: Sequence[int], start: int, alpha: float) -> torch.Tensor:
        if start == 0:
            self._prompts[slot] = []
        self._prompts[slot] += list(ids)
        found = SCRIPT.findall(self.tokenizer.decode(self._prompts[slot]))
        self._scripts[slot] = json.loads(found[-1]) if found else []
        return self._forced(slot, 0)

    def decode(
        self, tokens: Sequence[int], positions: Sequence[int], alphas: Sequence[float]
    ) -> torch.Tensor:
        if self.delay:
            time.sleep(self.delay)
        # The token fed at position p is generated token number p - prompt_len; the next one follows it.
        rows = [
            self._forced(slot, pos - len(self._prompts.get(slot, [])) + 1)
            for slot, pos in enumerate(positions)
        ]
        return torch.stack(rows)


def script(ids: Sequence[int]) -> str:
    """The user text that makes the scripted backend produce `ids`."""
    return f"SCRIPT{json.dumps(list(ids))}"

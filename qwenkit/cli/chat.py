"""`qwenkit chat`: an interactive streaming chat in the terminal, with the official demo's commands.

On a terminal it shows prompts and streams answers; Ctrl-C stops an answer, Ctrl-D or `:q` exits. When stdin is
not a terminal it reads one query per line and prints one answer per query (scriptable). Lines starting with ':'
are commands in both modes. Generation itself is `qwenkit.generation.chat.prepare_chat` + `qwenkit.generation.generate.stream`;
a `PrefixCache` keeps the last turn's KV cache, so each turn prefills only the new query (`--no-prefix-cache`: off).
"""

from __future__ import annotations

import ast
import sys
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

from ..generation.chat import prepare_chat, resolve_generation_config
from ..generation.generate import stream
from ..generation.prefix import PrefixCache
from ..generation.sampling import OVERRIDE_KEYS, SamplingParams
from ..model.transformer import QWenLMHeadModel
from ..tokenizer.chat_format import DEFAULT_SYSTEM
from ..tokenizer.tokenization import QWenTokenizer

# What :conf may change: the model card's generation settings (seed has its own command).
CONF_KEYS = tuple(k for k in OVERRIDE_KEYS if k not in ("seed", "stop", "stop_token_ids"))

HELP = """Commands:
  :help / :h                show this help
  :exit / :quit / :q        exit (Ctrl-D works too)
  :clear / :cl              clear the screen
  :clear-history / :clh     forget the conversation so far
  :history / :his           show the conversation so far
  :seed [N]                 show the seed, or set it (an integer, or 'random')
  :conf [key=value ...]     show the generation settings, or change some, e.g. :conf top_p=0.5 temperature=0.7
                            keys: {keys}
  :reset-conf               back to the settings the chat started with
  :system [TEXT]            show the system prompt, or set it (the history is kept)
Ctrl-C stops an answer and returns to the prompt."""


@dataclass
class ChatSession:
    model: QWenLMHeadModel
    tokenizer: QWenTokenizer
    out: TextIO
    err: TextIO
    system: str = DEFAULT_SYSTEM
    seed: int | None = None
    verbose: bool = False
    interactive: bool = False
    start_conf: dict[str, Any] = field(default_factory=dict)
    conf: dict[str, Any] = field(default_factory=dict)
    history: list[tuple[str, str]] = field(default_factory=list)
    # The last turn's KV cache; None: prefill the whole prompt every turn.
    prefix: PrefixCache | None = field(default_factory=PrefixCache)

    def __post_init__(self) -> None:
        self.conf = dict(self.start_conf)

    def settings(self) -> dict[str, Any]:
        """The effective generation settings: the model's generation config with this chat's changes."""
        cfg = resolve_generation_config(self.model)
        return {k: self.conf.get(k, cfg.get(k)) for k in CONF_KEYS}

    def answer(self, query: str) -> None:
        prompt, params = prepare_chat(
            self.model, self.tokenizer, query, self.history, self.system, None, None,
            {**self.conf, "seed": self.seed},
        )  # fmt: skip
        if self.interactive:
            self.out.write("\nQwen: ")
        pieces: list[str] = []
        start = time.perf_counter()
        n_tokens = 0
        reused_before = self.prefix.reused_tokens if self.prefix is not None else 0
        try:
            for chunk in stream(
                self.model, self.tokenizer, prompt, params, skip_special_tokens=True, prefix=self.prefix
            ):
                n_tokens += chunk.token_id is not None
                pieces.append(chunk.text)
                self.out.write(chunk.text)
                self.out.flush()
        except KeyboardInterrupt:
            self.out.write("\n[stopped]\n")
            self.out.flush()
            return  # an interrupted answer does not enter the history
        self.out.write("\n")
        self.out.flush()
        self.history.append((query, "".join(pieces).strip()))
        if self.verbose:
            seconds = time.perf_counter() - start
            reused = self.prefix.reused_tokens - reused_before if self.prefix is not None else 0
            self.err.write(
                f"[prompt {len(prompt)} tokens ({reused} reused), answer {n_tokens} tokens, "
                f"{n_tokens / seconds:.1f} tokens/s]\n"
            )

    def command(self, line: str) -> bool:
        """Run a ':' command; False means exit."""
        name, _, rest = line[1:].strip().partition(" ")
        rest = rest.strip()
        handler = {
            "help": self._help, "h": self._help,
            "clear": self._clear_screen, "cl": self._clear_screen,
            "clear-history": self._clear_history, "clh": self._clear_history,
            "history": self._show_history, "his": self._show_history,
            "seed": self._seed, "conf": self._conf, "reset-conf": self._reset_conf, "system": self._system,
        }.get(name)  # fmt: skip
        if name in ("exit", "quit", "q"):
            return False
        if handler is None:
            self.err.write(f"Unknown command :{name}. Type :help for the list.\n")
        else:
            handler(rest)
        return True

    def _help(self, _: str) -> None:
        self.out.write(HELP.format(keys=", ".join(CONF_KEYS)) + "\n")

    def _clear_screen(self, _: str) -> None:
        if self.interactive:
            self.out.write("\033[2J\033[H")

    def _clear_history(self, _: str) -> None:
        self.history.clear()
        self.out.write("History cleared.\n")

    def _show_history(self, _: str) -> None:
        if not self.history:
            self.out.write("(no history)\n")
        for i, (q, a) in enumerate(self.history, start=1):
            self.out.write(f"[{i}] User: {q}\n[{i}] Qwen: {a}\n")

    def _seed(self, arg: str) -> None:
        if arg:
            if arg == "random":
                self.seed = None
            elif arg.isdigit():
                self.seed = int(arg)
            else:
                self.err.write(f"Seed must be a non-negative integer or 'random', got {arg!r}.\n")
                return
        self.out.write(f"Seed: {'random' if self.seed is None else self.seed}\n")

    def _conf(self, arg: str) -> None:
        if arg:
            try:
                changes = dict(parse_assignment(item) for item in arg.split())
                candidate = {**self.conf, **changes}
                check_settings(resolve_generation_config(self.model), candidate)
            except ValueError as exc:
                self.err.write(f"Settings not changed: {exc}\n")
                return
            self.conf = candidate
        for key, value in self.settings().items():
            self.out.write(f"  {key} = {value}\n")

    def _reset_conf(self, _: str) -> None:
        self.conf = dict(self.start_conf)
        self._conf("")

    def _system(self, arg: str) -> None:
        if arg:
            self.system = arg
        self.out.write(f"System prompt: {self.system}\n")


def parse_assignment(item: str) -> tuple[str, Any]:
    """'key=value' -> (key, value) with the value read as a Python literal (never evaluated as code)."""
    key, sep, raw = item.partition("=")
    if not sep or key not in CONF_KEYS:
        raise ValueError(f"expected key=value with key one of {', '.join(CONF_KEYS)}, got {item!r}")
    lowered = {"true": True, "false": False, "none": None, "null": None}
    if raw.lower() in lowered:
        return key, lowered[raw.lower()]
    try:
        return key, ast.literal_eval(raw)
    except (ValueError, SyntaxError) as exc:
        raise ValueError(f"{key}: {raw!r} is not a number or true/false") from exc


def check_settings(cfg: dict[str, Any], conf: dict[str, Any]) -> None:
    """Raise ValueError (naming the field) if the settings would not make valid sampling parameters."""
    window = conf.get("max_window_size")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"max_window_size must be an int >= 1, got {window!r}")
    SamplingParams.from_generation_config(cfg, **{k: v for k, v in conf.items() if k != "max_window_size"})


def run_chat(session: ChatSession, stdin: TextIO) -> int:
    """The read-answer loop; returns the exit status."""
    if session.interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        session.out.write("qwenkit chat. Type :help for commands, :q or Ctrl-D to quit.\n")
    while True:
        try:
            line = input("\nUser: ") if session.interactive else stdin.readline()
        except EOFError:
            session.out.write("\n")
            return 0
        except KeyboardInterrupt:
            session.out.write("\n")
            continue
        if not session.interactive:
            if line == "":
                return 0
            line = line.rstrip("\r\n")
        if not line.strip():
            continue
        if line.startswith(":"):
            if not session.command(line):
                return 0
            continue
        session.answer(line)


def main_chat(args: Any) -> int:
    """Entry point of `qwenkit chat` (args from the argparse parser in cli.py)."""
    from ..checkpoints.loading import load

    model, tokenizer = load(
        args.model, dtype=args.dtype, device=args.device, kv_cache_dtype=getattr(args, "kv_cache", None),
        lora=getattr(args, "lora", None),
    )  # fmt: skip
    start_conf = {
        k: v
        for k, v in (
            ("temperature", args.temperature),
            ("top_p", args.top_p),
            ("top_k", args.top_k),
            ("repetition_penalty", args.repetition_penalty),
            ("max_new_tokens", args.max_new_tokens),
            ("max_window_size", args.max_window_size),
        )
        if v is not None
    }
    if args.greedy:
        start_conf["do_sample"] = False
    check_settings(resolve_generation_config(model), start_conf)
    session = ChatSession(
        model, tokenizer, sys.stdout, sys.stderr, system=args.system, seed=args.seed, verbose=args.verbose,
        interactive=sys.stdin.isatty(), start_conf=start_conf,
        prefix=None if getattr(args, "no_prefix_cache", False) else PrefixCache(),
    )  # fmt: skip
    return run_chat(session, sys.stdin)

"""Command-line layer: `qwenkit make-checkpoint | chat | generate | bench | quantize | serve`.

`main` parses arguments and imports each command's heavy modules lazily, so `qwenkit --help` stays fast;
`chat` is the interactive terminal chat. All behaviour lives in the layers below.
"""

from .commands import main

__all__ = ["main"]

"""A batch job's progress (tqdm): lines done of the input's, rows/s, tokens/s, ETA; quiet when
stderr is not a terminal unless asked; a one-line summary at the end either way."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm


class Progress:
    def __init__(self, total_lines: int, enabled: bool | None = None):
        """enabled None: a bar only when stderr is a terminal."""
        self.bar = tqdm(total=total_lines, unit="line", disable=not (enabled if enabled is not None
                        else sys.stderr.isatty()), dynamic_ncols=True)  # fmt: skip
        self.tokens, self.started = 0, time.perf_counter()

    def advance(self, tokens: int = 0) -> None:
        self.tokens += tokens
        self.bar.update(1)
        if tokens:
            elapsed = max(time.perf_counter() - self.started, 1e-9)
            self.bar.set_postfix(tok_s=f"{self.tokens / elapsed:.1f}", refresh=False)

    def close(self, summary) -> None:
        self.bar.close()
        print(f"batch: {summary.describe()}", file=sys.stderr)

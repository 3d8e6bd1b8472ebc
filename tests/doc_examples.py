"""Runs a Markdown page's examples in order, as a reader would: `python -m doc_examples PAGE`.

Fenced blocks marked ```python run in one interpreter (a page's Python blocks share their
names, like cells of one session); blocks marked ```bash run in bash with `-euo pipefail`, in
the same working directory, so a server one starts in the background (`&`) serves the blocks
after it. Other blocks (```text, ```json, ```yaml: output, formats, recipes) are shown, not run.
The caller runs this in its own session and kills the whole process group at the end, so a
background server never outlives the test.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

RUN = ("python", "bash")
SHOWN = ("text", "json", "yaml")
_FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```\s*$", re.MULTILINE | re.DOTALL)


def blocks(markdown: str) -> list[tuple[str, int, str]]:
    """(language, line number, code) for every fenced block of a page, in order."""
    found = []
    for match in _FENCE.finditer(markdown):
        line = markdown.count("\n", 0, match.start()) + 1
        found.append((match.group(1), line, match.group(2)))
    return found


def main(page: Path) -> None:
    namespace: dict = {"__name__": "__main__"}
    for language, line, code in blocks(page.read_text()):
        if language not in RUN:
            continue
        print(f"=== {page.name}:{line} ({language})", flush=True)
        if language == "python":
            exec(compile(code, f"{page.name}:{line}", "exec"), namespace)
        else:
            done = subprocess.run(["bash", "-euo", "pipefail", "-c", code])
            if done.returncode:
                raise SystemExit(f"{page.name}:{line}: bash exited {done.returncode}")
        sys.stdout.flush()


if __name__ == "__main__":
    main(Path(sys.argv[1]))

"""Every example in docs/ runs, top to bottom, in a fresh process (tests/doc_examples.py), and
prints what the page says it prints; the README's examples are docs examples, so they run too."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from doc_examples import RUN, SHOWN, blocks

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(p for p in DOCS.glob("*.md") if p.name != "architecture.md")

# What each page's examples must print (a page added to docs/ needs an entry).
EXPECT: dict[str, tuple[str, ...]] = {
    "python.md": (
        "Paris",
        "| stop",
        "int8 weights:",
        "restored on model=8: True",
        "gguf blocks: 97 MB",
    ),
    "cli.md": ("Paris", "Mesh(data=2, model=4)", "tok/s"),
    "serving.md": (
        '"object":"chat.completion"',
        "Paris",
        "shardinfer_requests_total",
        "via router",
    ),
    "batch.md": ("done: 3", "resumed: 0 new, 3 kept", "cosine"),
    "multihost.md": ("process 0 of 2: ", "process 1 of 2: ", "Paris"),
    "model-family.md": ("toy logits match the reference", "restored on model=8"),
    "benchmarks.md": ("tok/s",),
}


def test_every_page_has_checks_and_examples():
    assert sorted(EXPECT) == sorted(p.name for p in PAGES)
    for page in PAGES:
        found = blocks(page.read_text())
        assert any(lang in RUN for lang, _, _ in found), f"{page.name} has no example to run"
        for lang, line, _ in found:
            assert lang in RUN + SHOWN, f"{page.name}:{line}: say ```python, ```bash or ```text"


def test_the_readme_examples_are_docs_examples():
    """The README shows a few examples; each is copied from a docs page, which runs it."""
    documented = "\n".join(code for p in PAGES for _, _, code in blocks(p.read_text()))
    readme = (ROOT / "README.md").read_text()
    examples = [(lang, line, code) for lang, line, code in blocks(readme) if lang in RUN]
    for lang, line, code in examples[2:]:  # the first two are the install commands
        assert code in documented, f"README.md:{line}: this {lang} example is in no docs page"
    for page in PAGES:
        assert f"docs/{page.name}" in readme, f"the README does not point to docs/{page.name}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.stem)
def test_page_examples_run(page, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_NUM_CPU_DEVICES"] = "8"  # what the pages say to set for simulated devices
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # `shardinfer`
    env["PYTHONPATH"] = str(Path(__file__).parent)
    log = tmp_path / "output.txt"
    with log.open("w") as out:
        runner = subprocess.Popen(
            [sys.executable, "-m", "doc_examples", str(page)],
            cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            code = runner.wait(timeout=600)
        finally:  # a server a page left running goes with its process group
            with contextlib.suppress(ProcessLookupError):
                os.killpg(runner.pid, signal.SIGKILL)
    text = log.read_text()
    assert code == 0, text[-6000:]
    for expected in EXPECT[page.name]:
        assert expected in text, f"{page.name}: {expected!r} not printed\n{text[-6000:]}"

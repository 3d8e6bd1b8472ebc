"""Every notebook runs top to bottom with a real Jupyter kernel, prints what it is there to
show, and is committed without outputs (so its diffs stay readable)."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))

# What each notebook's outputs must hold (a notebook added to notebooks/ needs an entry).
EXPECT: dict[str, tuple[str, ...]] = {
    "01_quickstart": ("8 devices", "Paris", "| stop", "tokens_per_second"),
    "02_sharding": ("P(None, 'model')", "replicated", "same logits on every mesh: True"),
    "03_your_own_model": ("matches the reference: True", "restored on model=8: True"),
    "04_throughput": ("image/png",),
    "05_batch_and_embeddings": ("resumed", "cosine"),
}


def _shown(nb) -> str:
    """The text a reader sees: streams, results and the MIME types of rich outputs."""
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.output_type == "stream":
                parts.append(out.text)
            elif out.output_type in ("execute_result", "display_data"):
                parts.extend(out.data.keys())
                parts.append(str(out.data.get("text/plain", "")))
    return "\n".join(parts)


def test_every_notebook_has_checks_and_is_stripped():
    assert sorted(EXPECT) == sorted(p.stem for p in NOTEBOOKS)
    for path in NOTEBOOKS:
        for i, cell in enumerate(nbformat.read(path, as_version=4).cells):
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, (
                    f"{path.name} cell {i} has outputs: clear them before committing"
                )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path):
    nb = nbformat.read(path, as_version=4)
    # The notebooks ask for their simulated devices themselves (JAX_NUM_CPU_DEVICES).
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    client = NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    client.execute(env=env)  # raises CellExecutionError, with the cell and traceback, on error
    shown = _shown(nb)
    for expected in EXPECT[path.stem]:
        assert expected in shown, f"{path.name}: {expected!r} not in its outputs\n{shown[-4000:]}"

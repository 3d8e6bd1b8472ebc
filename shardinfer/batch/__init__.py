"""Offline batch jobs: a JSON-lines file through the mesh, resumable after any kill."""

from shardinfer.batch.job import run_batch
from shardinfer.batch.runner import BatchSummary

__all__ = ["BatchSummary", "run_batch"]

"""shardinfer: sharded inference for Flax NNX language models on a JAX device mesh."""

from shardinfer import distributed, family
from shardinfer.batch import BatchSummary, run_batch
from shardinfer.config import ModelConfig
from shardinfer.embedder import Embedder
from shardinfer.engine.llm import LLM, RequestOutput
from shardinfer.engine.sampling import SamplingParams
from shardinfer.mesh import make_mesh
from shardinfer.model import Model, init_random_model, load_model
from shardinfer.sharding import ShardingRules

__version__ = "0.1.0"

__all__ = [
    "LLM",
    "BatchSummary",
    "Embedder",
    "Model",
    "ModelConfig",
    "RequestOutput",
    "SamplingParams",
    "ShardingRules",
    "__version__",
    "distributed",
    "family",
    "init_random_model",
    "load_model",
    "make_mesh",
    "run_batch",
]

"""Everything a model family of your own needs, in one import: `from shardinfer import family`.

A family is a Flax NNX module whose parameters carry logical axes (made with `weight`), a
frozen config dataclass, and one `register(Family(...))`; the engine, `load_model`, `LLM`,
checkpoints and every mesh then work for it unchanged. docs/model-family.md walks through
one, and notebooks/03_your_own_model.ipynb builds one.
"""

from shardinfer.models.interface import LAYER_LOOPS, Decoder, Encoder, KVCache, LayerKV
from shardinfer.models.registry import Family, families, family_for, register, unregister
from shardinfer.models.weights import dense, dense_transposed, embed_rows, weight
from shardinfer.sharding import Sharder
from shardinfer.weights.loader import TensorRef

__all__ = [
    "LAYER_LOOPS",
    "Decoder",
    "Encoder",
    "Family",
    "KVCache",
    "LayerKV",
    "Sharder",
    "TensorRef",
    "dense",
    "dense_transposed",
    "embed_rows",
    "families",
    "family_for",
    "register",
    "unregister",
    "weight",
]

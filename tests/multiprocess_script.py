"""Run by tests/test_multiprocess.py in each of N processes (not a test module itself):
the Python API on a mesh that spans the processes; process 0 writes what it got as JSON."""

import json
import sys

from shardinfer import distributed

distributed.initialize()  # from SHARDINFER_* variables, before anything touches devices

import jax  # noqa: E402

import shardinfer as si  # noqa: E402
from shardinfer.weights import loader  # noqa: E402

# What the loader hands to the devices of this process: every slice placed, counted.
placed = {"bytes": 0}
real_placeable = loader._placeable


def counted(array, dtype):
    out = real_placeable(array, dtype)
    placed["bytes"] += out.nbytes
    return out


loader._placeable = counted
out_path, mesh = sys.argv[1], sys.argv[2]
model = si.load_model("smollm2-135m-instruct", mesh=mesh, weight_cache=None)
local_bytes = sum(
    shard.data.nbytes for leaf in jax.tree.leaves(model.state) for shard in leaf.addressable_shards
)
llm = si.LLM(model, max_batch=4, max_seq_len=256, compilation_cache=None)
chat = [{"role": "user", "content": "What is the capital of France?"}]
greedy = llm.chat(chat, si.SamplingParams(max_tokens=12, temperature=0.0))[0]
seeded = si.SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, seed=5)
sampled = llm.generate(["Once upon a time"] * 2, seeded)
logits = model.logits([[1, 2, 3, 4], [5, 6, 7, 8]])
result = {
    "process": jax.process_index(),
    "processes": jax.process_count(),
    "devices": jax.device_count(),
    "greedy": greedy.token_ids,
    "greedy_text": greedy.text,
    "sampled": [o.token_ids for o in sampled],
    "logits_head": logits[:, :, :64].tolist(),
    "argmax": logits.argmax(-1).tolist(),
    "placed_bytes": placed["bytes"],
    "local_shard_bytes": local_bytes,
    "weight_bytes": model.weight_bytes(),
}
with open(f"{out_path}.{jax.process_index()}", "w") as f:
    json.dump(result, f)

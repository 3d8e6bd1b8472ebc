"""Continuous batching: independence of requests, slot choice, and no compiles after warm-up."""

import numpy as np
import pytest

import shardinfer as si
from shardinfer.engine.metrics import compilations

MAX_SEQ = 64


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return si.LLM(tiny_llama, mesh="data=2,model=4", max_batch=4, max_seq_len=MAX_SEQ)


def _workload(n: int = 20):
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, 256, rng.integers(1, 40)).tolist() for _ in range(n)]
    params = [
        si.SamplingParams(max_tokens=int(rng.integers(1, 20)), temperature=0.0, ignore_eos=True)
        for _ in range(n)
    ]
    return prompts, params


def test_each_request_equals_itself_alone(llm):
    prompts, params = _workload()
    together = llm.generate(prompts, params)
    for prompt, p, out in zip(prompts, params, together, strict=True):
        alone = llm.generate([prompt], p)[0]
        assert out.prompt_token_ids == prompt  # in the order given
        assert out.token_ids == alone.token_ids
        assert len(out.token_ids) == p.max_tokens and out.finish_reason == "length"


def test_seeded_sampling_is_reproducible_among_others(llm):
    prompts, params = _workload(8)
    sampled = si.SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=11)
    mixed = [sampled if i % 2 else p for i, p in enumerate(params)]
    first = llm.generate(prompts, mixed)
    second = llm.generate(prompts[::-1], mixed[::-1])[::-1]  # other neighbours, other slots
    assert [o.token_ids for o in first] == [o.token_ids for o in second]
    alone = llm.generate([prompts[1]], sampled)[0]
    assert alone.token_ids == first[1].token_ids


def test_no_compilation_after_warmup(tiny_llama):
    """warmup() compiles every step shape; then a mixed workload compiles nothing: arrivals
    alone and together, every prompt bucket, greedy and sampled rows, every decode bucket,
    and the cache growing from 128 to 512 positions and shrinking back."""
    llm = si.LLM(tiny_llama, mesh="data=2,model=4", max_batch=4, max_seq_len=512, seed=0)
    report = llm.warmup()
    assert report["programs"] > 0 and report["seconds"] > 0
    before = compilations()
    rng = np.random.default_rng(5)
    lengths = [1, 17, 33, 65, 129, 257, 300, 5, 2, 40]
    prompts = [rng.integers(0, 256, n).tolist() for n in lengths]
    params = [
        si.SamplingParams(max_tokens=int(rng.integers(1, 150)), temperature=0.0, ignore_eos=True)
        for _ in prompts
    ]
    params[2] = si.SamplingParams(max_tokens=9, temperature=0.8, top_p=0.5, seed=4)
    llm.generate(prompts, params)  # together: groups, and slots refilled as others finish
    for prompt, p in zip(prompts[:3], params[:3], strict=True):
        llm.generate([prompt], p)  # alone: one row, one live slot
    long = si.SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
    llm.generate([prompts[0]], long)  # the cache grows past 128 positions, then shrinks
    assert compilations() == before
    assert llm.core.engine.capacity in (128, 256)


def test_metrics(llm):
    before = llm.metrics.requests_finished
    llm.generate([[1, 2, 3], [4, 5]], si.SamplingParams(max_tokens=5, ignore_eos=True))
    m = llm.metrics
    assert m.requests_finished == before + 2
    assert m.live_slots == 0 and m.queue_length == 0
    summary = m.summary()
    assert summary["tokens_per_second"] > 0 and summary["ttft_median_s"] > 0


def test_first_token_is_handed_out_before_any_decode_step(llm):
    """A step that admits returns at once (the first token does not wait for a decode step),
    and two admitting steps never come in a row (arrivals cannot starve running requests)."""
    core = llm.core
    greedy = si.SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    first = core.make_request([1, 2, 3], greedy)
    core.add(first)
    steps = core.metrics.decode_steps
    assert core.step() == [first]
    assert len(first.output_ids) == 1 and core.metrics.decode_steps == steps
    second = core.make_request([4, 5], greedy)
    core.add(second)  # waiting while `first` runs: the next step decodes
    assert core.step() == [first] and len(first.output_ids) == 2
    assert core.step() == [second] and len(first.output_ids) == 2
    assert sorted(map(id, core.step())) == sorted(map(id, [first, second]))
    while core.has_work():
        core.step()
    alone = llm.generate([[4, 5]], greedy)[0]
    assert second.output_ids == alone.token_ids


def test_abandoned_run_frees_its_slot(llm):
    request = llm.core.make_request([1, 2, 3], si.SamplingParams(max_tokens=30, ignore_eos=True))
    steps = llm.core.run([request])
    next(steps), next(steps)
    assert llm.metrics.live_slots == 1
    steps.close()  # the caller went away (a closed stream, a disconnected client)
    assert request.finish_reason == "abort"
    assert llm.metrics.live_slots == 0 and not llm.core.has_work()


def test_long_generation_across_cache_buckets_matches_hf(tiny_llama):
    """150 greedy tokens: decode attends over 128, then 256 cache positions (of 512)."""
    import torch
    from conftest import hf_model

    prompt = [3, 14, 15, 92, 65]
    llm = si.LLM(tiny_llama, mesh="data=2,model=4", max_batch=2, max_seq_len=512)
    ours = llm.generate([prompt], si.SamplingParams(max_tokens=150, temperature=0.0,
                                                    ignore_eos=True))[0].token_ids  # fmt: skip
    reference = hf_model(tiny_llama)
    reference.generation_config.eos_token_id = None
    with torch.no_grad():
        expected = reference.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, 5, dtype=torch.long),
            do_sample=False, max_new_tokens=150,
        )[0, 5:].tolist()  # fmt: skip
    assert ours == expected


@pytest.mark.parametrize("mesh", ["data=8", "model=8", "data=2,model=4"])
def test_decode_buckets_match_hf_on_every_mesh(tiny_llama, mesh):
    """Requests of different lengths on 16 slots: as they finish, decode runs over smaller
    buckets of live slots (gathered per `data` shard, written back in place); every request's
    greedy tokens still equal transformers'."""
    import torch
    from conftest import hf_model

    llm = si.LLM(tiny_llama, mesh=mesh, max_batch=16, max_seq_len=256)
    rng = np.random.default_rng(7)
    prompts = [rng.integers(0, 256, int(n)).tolist() for n in (3, 9, 20, 5, 33)]
    budgets = [40, 3, 25, 12, 1]
    params = [si.SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in budgets]
    outs = llm.generate(prompts, params)
    reference = hf_model(tiny_llama)
    reference.generation_config.eos_token_id = None
    for prompt, n, out in zip(prompts, budgets, outs, strict=True):
        with torch.no_grad():
            expected = reference.generate(
                torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                do_sample=False, max_new_tokens=n,
            )[0, len(prompt):].tolist()  # fmt: skip
        assert out.token_ids == expected


def test_a_failed_step_ends_its_requests_with_error_and_the_engine_recovers(llm, monkeypatch):
    """A program that fails after its cache was donated (here: the decode's cache write)
    ends the running requests with "error" and raises; the next requests run normally."""
    greedy = si.SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    expected = llm.generate([[5, 6, 7]], greedy)[0].token_ids
    engine = llm.core.engine
    real_write = engine._write
    calls = {"n": 0}

    def failing_write(*args):
        calls["n"] += 1
        if calls["n"] == 2:
            real_write(*args)  # consumes the donated cache, as a failing device call may
            raise RuntimeError("device lost")
        return real_write(*args)

    monkeypatch.setattr(engine, "_write", failing_write)
    requests = [llm.core.make_request(p, greedy) for p in ([1, 2], [5, 6, 7])]
    with pytest.raises(RuntimeError, match="device lost"):
        for _ in llm.core.run(requests):
            pass
    assert {r.finish_reason for r in requests} == {"error"}
    assert llm.metrics.live_slots == 0
    assert llm.generate([[5, 6, 7]], greedy)[0].token_ids == expected

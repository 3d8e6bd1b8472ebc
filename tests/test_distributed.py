"""distributed.initialize without other processes: what it reads, when it does nothing, and
the errors that save a user from a silently smaller mesh."""

import pytest

from shardinfer import distributed


def test_one_process_is_a_no_op():
    assert distributed.initialize(environ={}) is False
    assert distributed.initialize(num_processes=1, environ={}) is False
    env = {distributed.ENV_NUM_PROCESSES: "1"}
    assert distributed.initialize(environ=env) is False


def test_several_processes_need_a_coordinator_and_an_id():
    with pytest.raises(ValueError, match="need a coordinator address and this process's id"):
        distributed.initialize(num_processes=2, environ={})
    env = {distributed.ENV_NUM_PROCESSES: "2", distributed.ENV_COORDINATOR: "127.0.0.1:1"}
    with pytest.raises(ValueError, match="SHARDINFER_PROCESS_ID"):
        distributed.initialize(environ=env)


def test_joining_after_the_backend_started_is_refused():
    import jax

    jax.devices()  # the backend is up (as in any test here)
    env = {
        distributed.ENV_COORDINATOR: "127.0.0.1:1",
        distributed.ENV_NUM_PROCESSES: "2",
        distributed.ENV_PROCESS_ID: "0",
    }
    with pytest.raises(RuntimeError, match="must run before anything uses JAX devices"):
        distributed.initialize(environ=env)


def test_plans_survive_the_wire():
    import numpy as np

    from shardinfer.engine import broadcast
    from shardinfer.engine.params import SamplingArrays, SamplingParams
    from shardinfer.engine.plan import DECODE, PREFILL, SlotLayout, StepPlan

    layout = SlotLayout(slots=8, data_shards=2, prefill_rows=4, max_seq_len=64, min_capacity=64)
    size = broadcast.buffer_size(layout)
    sampling = SamplingArrays.greedy(4)
    sampling.set(1, SamplingParams(temperature=0.7, top_k=5, top_p=0.9), seed=2**32 - 1)
    plans = [
        StepPlan(PREFILL, np.arange(4 * 64, dtype=np.int32).reshape(4, 64),
                 np.array([64, 3, 1, 1], np.int32), np.array([0, 4, 8, 8], np.int32), sampling,
                 64),
        StepPlan(DECODE, np.arange(8, dtype=np.int32), np.arange(1, 9, dtype=np.int32),
                 np.arange(8, dtype=np.int32), SamplingArrays.greedy(8), 64),
    ]  # fmt: skip
    for plan in plans:
        back = broadcast.decode(broadcast.encode(plan, size))
        for name, value in plan.arrays().items():
            np.testing.assert_array_equal(back.arrays()[name], value, err_msg=name)
            assert back.arrays()[name].dtype == value.dtype, name
    assert broadcast.decode(broadcast.encode(None, size)) is None
    assert broadcast.decode(broadcast.encode(broadcast.IDLE, size)) == broadcast.IDLE


def test_an_explicit_single_process_wins_over_cluster_variables():
    """A task of a SLURM array running a job of its own: SHARDINFER_NUM_PROCESSES=1."""
    env = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1", "SHARDINFER_NUM_PROCESSES": "1"}
    assert distributed.initialize(environ=env) is False

"""The routing policy shared by the replica router and the HTTP router, and how the HTTP router
reads a backend's /metrics into that policy's inputs."""

import pytest

from shardinfer.serving.backends import Backend
from shardinfer.serving.balance import Load, Policy, ewma


def test_a_free_slot_wins_over_less_work():
    loads = [Load(0, 10.0), Load(2, 500.0)]
    assert Policy().pick(loads) == 1


def test_work_is_weighed_by_measured_speed():
    # Both full; the second holds twice the tokens but works three times as fast.
    loads = [Load(0, 300.0, speed=10.0), Load(0, 600.0, speed=30.0)]
    assert Policy().pick(loads) == 1
    # Unmeasured targets count as the mean of the measured ones.
    assert Policy().pick([Load(0, 300.0, speed=None), Load(0, 600.0, speed=30.0)]) == 0
    # Unknown free slots (a vLLM backend) are not taken as full.
    assert Policy().pick([Load(0, 0.0), Load(None, 0.0)]) == 1


def test_ties_go_to_fewer_waiting_then_the_lowest_index():
    assert Policy().pick([Load(0, 5.0, waiting=3), Load(0, 5.0, waiting=1)]) == 1
    assert Policy().pick([Load(1, 0.0), Load(1, 0.0)]) == 0


def test_round_robin_ignores_load_and_unknown_policies_are_refused():
    rr = Policy("round_robin")
    assert [rr.pick([Load(5, 0.0), Load(0, 900.0)]) for _ in range(4)] == [0, 1, 0, 1]
    with pytest.raises(ValueError, match="unknown routing policy 'random'"):
        Policy("random")
    with pytest.raises(ValueError, match="no target"):
        Policy().pick([])


def test_ewma_follows_without_jumping():
    assert ewma(None, 10.0) == 10.0
    assert ewma(10.0, 20.0) == pytest.approx(13.0)


METRICS = """\
# TYPE shardinfer_slots gauge
shardinfer_slots{replica="0"} 4.0
shardinfer_slots{replica="1"} 4.0
shardinfer_live_slots{replica="0"} 4.0
shardinfer_live_slots{replica="1"} 1.0
shardinfer_queue_length{replica="0"} 1.0
shardinfer_queue_length{replica="1"} 0.0
shardinfer_outstanding_tokens{replica="0"} 300.0
shardinfer_outstanding_tokens{replica="1"} 20.0
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="m"} 5.0
vllm:num_requests_waiting{model_name="m"} 1.0
# TYPE vllm:generation_tokens counter
vllm:generation_tokens_total{model_name="m"} %d
"""


def test_a_backend_reads_its_load_and_speed_from_metrics():
    b = Backend("http://x")
    b.read_metrics(METRICS % 1000, now=100.0)
    load = b.load()
    assert (load.free_slots, load.outstanding_tokens, load.waiting) == (2, 320.0, 1)
    assert load.speed is None  # one reading: no rate yet
    b.sent_since_poll = 2  # sent since: the free slots it reported are taken
    assert b.load().free_slots == 0
    b.read_metrics(METRICS % 1500, now=105.0)
    assert b.load().speed == pytest.approx(100.0) and b.sent_since_poll == 0
    b.in_flight_tokens = 900.0  # the router's own count is fresher than the report
    assert b.load().outstanding_tokens == 900.0


def test_a_vllm_backend_has_unknown_free_slots():
    b = Backend("http://vllm")
    b.read_metrics(
        'vllm:num_requests_running{model_name="m"} 3.0\n'
        'vllm:num_requests_waiting{model_name="m"} 0.0\n',
        now=1.0,
    )
    assert b.load().free_slots is None and b.load().waiting == 0

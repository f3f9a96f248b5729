"""sim.core.averaging: the tail average of a run's turn-end weights (average-from)."""
from __future__ import annotations

import pytest
import torch

from sim.core.averaging import TailAverage, first


def test_first_turn_of_the_average():
    assert first(4, 0.0) == 1 and first(4, 0.5) == 3 and first(4, 0.25) == 2
    assert first(4, 1.0) == 4 and first(1, 0.0) == 1 and first(3, 0.99) == 3  # at least the last turn
    with pytest.raises(ValueError, match="averaging start"):
        first(4, 1.5)


def test_the_average_is_the_mean_of_the_kept_turns_and_start_1_is_the_last_state_exactly():
    states = [{"w": torch.full((2,), float(i)) * 0.1, "n": torch.tensor(i)} for i in range(1, 5)]
    avg = TailAverage(4, 0.5)
    for turn, st in enumerate(states, start=1):
        avg.add(turn, lambda st=st: st)
    assert avg.count == 2
    assert torch.allclose(avg.state()["w"], torch.full((2,), 0.35))
    assert avg.state()["n"] == 4  # an integer buffer: the last turn's
    last = TailAverage(4, 1.0)
    for turn, st in enumerate(states, start=1):
        last.add(turn, lambda st=st: st)
    assert torch.equal(last.state()["w"], states[-1]["w"])
    whole = TailAverage(4, 0.0)
    for turn, st in enumerate(states, start=1):
        whole.add(turn, lambda st=st: st)
    assert torch.allclose(whole.state()["w"], torch.full((2,), 0.25))


def test_the_state_keeps_each_tensor_s_dtype_and_a_copy_not_a_reference():
    w = torch.ones(3, dtype=torch.float16)
    avg = TailAverage(1, 0.0)
    avg.add(1, lambda: {"w": w})
    w.add_(1)  # the model trains on
    assert avg.state()["w"].dtype == torch.float16 and torch.equal(avg.state()["w"], torch.ones(3, dtype=torch.float16))


def test_no_turn_reached_the_average():
    with pytest.raises(RuntimeError, match="no turn"):
        TailAverage(3, 0.0).state()


def test_config_refuses_an_average_start_outside_the_run():
    from sim.core.config import ExperimentConfig

    with pytest.raises(ValueError, match="average-from"):
        ExperimentConfig(average_from=1.5)


def test_the_state_is_read_only_for_the_turns_the_average_holds():
    calls = []
    avg = TailAverage(4, 0.5)
    for turn in range(1, 5):
        avg.add(turn, lambda turn=turn: calls.append(turn) or {"w": torch.full((1,), float(turn))})
    assert calls == [3, 4] and torch.equal(avg.state()["w"], torch.full((1,), 3.5))

"""The typed wire: round trips, validation on receipt, byte accounting; the transcript."""
from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from sim.engine.transcript import MessageStat, Transcript
from sim.core.wire import WireError, decode, encode, record_nbytes
from strategies.fedavg import FitRes
from strategies.nograd import Features, FeaturesRequest
from strategies.vanilla import VanillaReply, VanillaRequest


def _features(k=2, b=3):
    return Features(control_input=torch.randn(k, b, 3, 8, 8), unet_features=torch.randn(k, b, 4, 8, 8),
                    t=torch.randint(0, 1000, (k, b)), noise=torch.randn(k, b, 3, 8, 8),
                    context=torch.randn(k, b, 5, 6))


def test_round_trip_is_exact_and_detached():
    msg = _features()
    msg.noise.requires_grad_(True)
    back = decode(encode(msg), Features)
    for name in ("control_input", "unet_features", "t", "noise", "context"):
        assert torch.equal(getattr(back, name), getattr(msg, name).detach())
        assert not getattr(back, name).requires_grad
    req = decode(encode(VanillaRequest(head={"w": torch.ones(2)}, want_batch=False)), VanillaRequest)
    assert req.control_features_grad is None and not req.want_batch and torch.equal(req.head["w"], torch.ones(2))


def _tamper(content: RecordDict, name: str, value: torch.Tensor) -> RecordDict:
    tensors = content.array_records["tensors"].to_torch_state_dict()
    tensors[name] = value
    content["tensors"] = ArrayRecord(torch_state_dict=tensors)
    return content


@pytest.mark.parametrize("name,value,why", [
    ("noise", torch.randn(2, 3, 3, 8, 8, dtype=torch.float64), "dtype"),
    ("t", torch.zeros(2, 3, dtype=torch.int32), "dtype"),
    ("context", torch.randn(2, 3, 5), "dims"),
    ("control_input", torch.full((2, 3, 3, 8, 8), float("nan")), "NaN"),
    ("unet_features", torch.full((2, 3, 4, 8, 8), float("inf")), "NaN or Inf"),
    ("noise", torch.randn(2, 4, 3, 8, 8), "leading shape"),
])
def test_bad_payloads_are_rejected_naming_the_field(name, value, why):
    content = _tamper(encode(_features()), name, value)
    with pytest.raises(WireError, match=why) as e:
        decode(content, Features)
    assert "Features" in str(e.value) and (name in str(e.value) or why == "leading shape")


def test_missing_fields_and_bad_configs_are_rejected():
    content = encode(_features())
    tensors = content.array_records["tensors"].to_torch_state_dict()
    del tensors["t"]
    content["tensors"] = ArrayRecord(torch_state_dict=tensors)
    with pytest.raises(WireError, match=r"Features\.t: missing"):
        decode(content, Features)
    with pytest.raises(WireError, match=r"FeaturesRequest\.k"):
        decode(RecordDict({"config": ConfigRecord({"k": "ten"})}), FeaturesRequest)
    with pytest.raises(WireError, match="k must be >= 1"):
        decode(encode(FeaturesRequest(0)), FeaturesRequest)
    with pytest.raises(WireError, match="neither a batch nor the head"):
        decode(encode(VanillaReply()), VanillaReply)
    with pytest.raises(WireError, match=r"FitRes\.arrays\['w'\]"):
        decode(encode(FitRes({"w": torch.tensor([float("nan")])}, 3, [0.1])), FitRes)


def test_record_nbytes_counts_buffers_and_scalars():
    msg = _features(k=1, b=1)
    raw = sum(getattr(msg, n).numel() * getattr(msg, n).element_size()
              for n in ("control_input", "unet_features", "t", "noise", "context"))
    n = record_nbytes(encode(msg))
    assert raw < n < raw + 5 * 256  # + one .npy header per array
    assert record_nbytes(encode(FeaturesRequest(10))) == 8


def test_transcript_per_step_adds_up_and_keeps_only_what_it_is_told():
    t = Transcript(keep=1)
    for i, (first, n) in enumerate([(0, 2), (2, 1), (3, 0)]):
        t.add(MessageStat(i, i + 1, "x", 0, "query.x", first, n, 10 * (i + 1), 100, 0.1, 1.0, 0.2),
              RecordDict(), RecordDict())
    per = t.per_step(3)
    assert sum(per["bytes_down"]) == pytest.approx(t.bytes_down) and sum(per["bytes_up"]) == t.bytes_up
    assert per["bytes_down"] == [5, 5, 20 + 30]  # the step-less last message counts for the last step
    assert len(t.seen) == 1 and t.messages == 3
    last = Transcript(keep=2, keep_last=True)
    for i in range(5):
        last.add(MessageStat(i, i + 1, "x", 0, "query.x", i, 1, 1, 1, 0.1, 1.0, 0.2), RecordDict(), RecordDict())
    assert [stat.index for stat, _, _ in last.seen] == [3, 4] and last.messages == 5

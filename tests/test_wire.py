"""The typed wire: round trips, validation on receipt, byte accounting; the transcript."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from conftest import HashTextEncoder, make_base, model_context
from sim.core.models import BaseModel, build_controlnet, ddpm_scheduler
from sim.core.wire import (
    TRANSPORT_METRICS,
    Expect,
    WireError,
    config,
    decode,
    encode,
    record_nbytes,
    shapes_of,
)
from sim.engine.client_app import client_app_for
from sim.engine.grid import InProcessGrid, discover
from sim.engine.runner import run_strategy
from sim.engine.transcript import CLIENT_PEAK_MB, CLIENT_S, CLIENT_SETUP_S, MessageStat, Transcript
from strategies import get_strategy
from strategies.base import ClientData, ClientEnv, TrainSettings
from strategies.fedavg import FitIns, FitRes
from strategies.nograd import Features, FeaturesRequest
from strategies.vanilla import BATCH_FIELDS, VanillaReply, VanillaRequest


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


# ----------------------------------------------------------------------------- full validation on receipt
EXPECT = Expect(shapes={"control_input": (3, 8, 8), "unet_features": (4, 8, 8), "noise": (3, 8, 8), "context": (5, 6)},
                ranges={"t": (0, 1000)})  # what the receiver's model fixes about _features()


def test_expectations_accept_a_matching_payload():
    back = decode(encode(_features()), Features, EXPECT)
    assert back.t.shape == (2, 3)
    partial = Expect(shapes={"context": (None, 6)})  # None: any size there (e.g. a token count not known)
    assert decode(encode(_features()), Features, partial).context.shape == (2, 3, 5, 6)


@pytest.mark.parametrize("name,value", [
    ("unet_features", torch.randn(2, 3, 5, 8, 8)),  # wrong channel count
    ("noise", torch.randn(2, 3, 3, 8, 9)),  # wrong spatial size
    ("context", torch.randn(2, 3, 7, 6)),  # wrong token count
])
def test_a_wrong_trailing_shape_is_rejected(name, value):
    content = _tamper(encode(_features()), name, value)
    decode(content, Features)  # the rank is right: only the receiver's model says the shape is wrong
    with pytest.raises(WireError, match=rf"Features\.{name}: shape .* expected trailing shape") as e:
        decode(content, Features, EXPECT)
    assert name in str(e.value)


@pytest.mark.parametrize("bad", [1000, -1])
def test_timesteps_out_of_range_are_rejected(bad):
    t = torch.randint(0, 1000, (2, 3))
    t[1, 2] = bad
    with pytest.raises(WireError, match=r"Features\.t: values in .* expected in \[0, 1000\)"):
        decode(_tamper(encode(_features()), "t", t), Features, EXPECT)


@pytest.mark.parametrize("k,b", [(2, 0), (0, 3)])
def test_an_empty_batch_is_rejected_without_expectations(k, b):
    with pytest.raises(WireError, match=r"Features\.control_input: empty"):
        decode(encode(_features(k=k, b=b)), Features)
    reply = VanillaReply(torch.randn(0, 4, 8, 8), torch.randn(0, 4, 8, 8), torch.zeros(0, dtype=torch.int64),
                         torch.randn(0, 3, 8, 8), None)
    with pytest.raises(WireError, match=r"VanillaReply\.control_features: empty"):
        decode(encode(reply), VanillaReply)


def test_a_state_dict_whose_keys_or_shapes_differ_from_the_model_s_is_rejected():
    model = {"w": torch.ones(2, 3), "b": torch.ones(2)}
    expect = Expect(states={"arrays": shapes_of(model)})
    assert decode(encode(FitRes(dict(model), 3, [0.1])), FitRes, expect).arrays.keys() == model.keys()
    renamed = {"w": torch.ones(2, 3), "bias": torch.ones(2)}
    with pytest.raises(WireError, match=r"FitRes\.arrays: keys differ .*missing \['b'\].*unexpected \['bias'\]"):
        decode(encode(FitRes(renamed, 3, [0.1])), FitRes, expect)
    with pytest.raises(WireError, match=r"FitRes\.arrays: keys differ .*missing \['b'\]"):
        decode(encode(FitRes({"w": torch.ones(2, 3)}, 3, [0.1])), FitRes, expect)
    with pytest.raises(WireError, match=r"FitIns\.arrays\['w'\]: shape \(3, 2\), expected \(2, 3\)"):
        decode(encode(FitIns({"w": torch.ones(3, 2), "b": torch.ones(2)}, 1, 2)), FitIns,
               Expect(states={"arrays": shapes_of(model)}))


def _extra_tensor(content):
    return _tamper(content, "x_0", torch.randn(2, 3, 3, 8, 8))


def _extra_config(content):
    content["config"] = ConfigRecord({"debug": 1})
    return content


def _extra_metric(content):
    content["metrics"] = MetricRecord({"leak": 1.0})
    return content


def _extra_state(content):
    content["weights"] = ArrayRecord(torch_state_dict={"w": torch.ones(2)})
    return content


def _extra_record(content):
    content["stats"] = MetricRecord({"n": 1})
    return content


@pytest.mark.parametrize("add,name,kind", [
    (_extra_tensor, "x_0", "an undeclared tensor"), (_extra_config, "debug", "an undeclared config"),
    (_extra_metric, "leak", "an undeclared metric"), (_extra_state, "weights", "an undeclared array record"),
    (_extra_record, "stats", "an undeclared record"),
])
def test_a_field_the_message_does_not_declare_is_rejected(add, name, kind):
    with pytest.raises(WireError, match=rf"Features\.{name}: not a field of Features \({kind}\)"):
        decode(add(encode(_features())), Features)


def test_transport_metrics_are_allowed_on_replies_but_must_be_finite():
    assert TRANSPORT_METRICS == {CLIENT_S, CLIENT_PEAK_MB, CLIENT_SETUP_S}  # what the ClientApp adds to every reply
    content = encode(FitRes({"w": torch.ones(2)}, 3, [0.1]))
    content["metrics"][CLIENT_S], content["metrics"][CLIENT_PEAK_MB] = 0.5, 100.0
    assert decode(content, FitRes).num_examples == 3
    content["metrics"][CLIENT_S] = float("nan")
    with pytest.raises(WireError, match=rf"FitRes\.{CLIENT_S}: nan is not finite"):
        decode(content, FitRes)


@dataclass
class _Tuned:
    """A message with float configs (no scheme's message has one yet)."""

    scale: float = config(float)
    weights: list = config(list)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_or_inf_in_metrics_and_configs_is_rejected(bad):
    with pytest.raises(WireError, match=r"FitRes\.losses: 1 of 3 values are NaN or Inf"):
        decode(encode(FitRes({"w": torch.ones(2)}, 3, [0.1, bad, 0.2])), FitRes)
    with pytest.raises(WireError, match=r"_Tuned\.weights: 1 of 2 values are NaN or Inf"):
        decode(encode(_Tuned(1.0, [0.5, bad])), _Tuned)
    with pytest.raises(WireError, match=r"_Tuned\.scale: .* is not finite"):
        decode(encode(_Tuned(bad, [0.5])), _Tuned)


def test_a_stale_expectation_is_a_programming_error():
    with pytest.raises(TypeError, match="no tensor field 'control_features'"):
        decode(encode(_features()), Features, Expect(shapes={"control_features": (3, 8, 8)}))
    with pytest.raises(TypeError, match="no state field 'arrays'"):
        decode(encode(_features()), Features, Expect(states={"arrays": {}}))
    with pytest.raises(TypeError, match="more dims"):
        decode(encode(_features()), Features, Expect(shapes={"t": (3, 8, 8)}))


@pytest.fixture(scope="module")
def models():
    base = make_base("tiny", seed=3)
    torch.manual_seed(0)
    return base, build_controlnet(base.unet, base.preset)


@pytest.mark.parametrize("scheme,defenses", [
    ("fedavg", ()), ("vanilla", ()), ("splitfed", ()), ("nograd", ()),
    ("vanilla", ("fp16", "prompt-local")), ("nograd", ("fp16:offset=true", "prompt-local", "timestep:t-start=226")),
])
def test_real_round_trips_decode_with_the_receivers_expectations(scheme, defenses, models):
    """Each scheme's real messages, each way, decode against what the receiving side's own models
    fix (the expectations the Channel, FedAvg's aggregation and the ClientApp use), defended too."""
    base, cn = models
    settings = TrainSettings(lr=1e-3, steps=2, local_steps=1, batch_size=2, defenses=defenses)
    s, sched = base.preset.image_size, ddpm_scheduler(base.preset)
    g = torch.Generator().manual_seed(0)
    data = ClientData(torch.rand(4, 3, s, s, generator=g) * 2 - 1, torch.rand(4, 3, s, s, generator=g), ["a cat"] * 4)
    cls = get_strategy(scheme)
    server = cls(base.unet, cn, sched, settings, null_context=base.encode_prompts([""]))
    client = cls.client_class(0, ClientEnv(base, sched, settings, data, 0, cn, client_seed=7))

    def cross(msg, typ, expect):
        return decode(encode(msg), typ, expect)

    if scheme == "fedavg":
        request = cross(FitIns(dict(cn.state_dict()), 1, 1), FitIns, client.request_expect())
        reply = cross(client.serve(request), FitRes, server.reply_expect())
        assert reply.arrays.keys() == cn.state_dict().keys() and len(reply.losses) == 1
        return
    expect = server.reply_expect()
    assert all(None not in shape for shape in expect.shapes.values())  # every trailing size known: nothing vacuous
    if scheme == "nograd":
        assert client.request_expect() is None  # a request for k batches: nothing model-dependent
        reply = cross(client.serve(cross(FeaturesRequest(2), FeaturesRequest, None)), Features, expect)
        assert reply.control_input.shape[:2] == (2, 2)
        if defenses:  # fp16 on the wire, no context, t >= 226: still what the server expects
            assert reply.control_input.dtype == torch.float16 and reply.context is None and int(reply.t.min()) >= 226
        return
    request = cross(VanillaRequest(head=server.head_state), VanillaRequest, client.request_expect())
    reply = cross(client.serve(request), VanillaReply, expect)
    assert (reply.context is None) == bool(defenses)
    _, grad = server.train_step(*(getattr(reply, n) for n in BATCH_FIELDS))
    request = cross(VanillaRequest(control_features_grad=grad, want_batch=False), VanillaRequest,
                    client.request_expect())
    assert cross(client.serve(request), VanillaReply, expect).head.keys() == server.head_state.keys()


def _mismatched_run(scheme, base, cn, client_base, template):
    settings = TrainSettings(lr=1e-3, steps=1, local_steps=1, batch_size=2)
    s, sched = base.preset.image_size, ddpm_scheduler(base.preset)
    data = ClientData(torch.rand(4, 3, s, s) * 2 - 1, torch.rand(4, 3, s, s), ["a cat"] * 4)
    envs = [ClientEnv(client_base, sched, settings, data, 0, template) for _ in range(2)]
    grid = InProcessGrid(client_app_for(envs), 2, {})
    run_strategy(scheme, model_context(base, cn, settings, 0, sched), grid, discover(grid, 2))


def test_the_apps_check_what_they_receive_against_their_own_models(models):
    """Expectations are on in the real path: the server's Channel rejects a batch whose context has
    another token count than its text encoder's, and a FedAvg client rejects global weights that
    lack tensors its own ControlNet has."""
    base, cn = models
    p = base.preset
    other_text = BaseModel(p, base.unet, base.autoencoder, HashTextEncoder(p.max_tokens + 1, p.cross_attention_dim))
    with pytest.raises(WireError, match=r"client 0 .*Features\.context: shape \(1, 2, 17, 384\)"):
        _mismatched_run("nograd", base, cn, other_text, cn)
    bigger = copy.deepcopy(cn)
    bigger.extra = torch.nn.Linear(1, 1)
    # raised in the client: the in-process grid runs the ClientApp in this process
    with pytest.raises(WireError, match=r"FitIns\.arrays: keys differ .*missing \['extra\.weight'"):
        _mismatched_run("fedavg", base, cn, base, bigger)


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

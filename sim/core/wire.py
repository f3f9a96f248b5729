"""The typed wire: every payload between server and clients is a dataclass with declared fields.

A message class declares each field with :func:`tensor` (a torch tensor of a given dtype
and rank), :func:`state` (a dict of named tensors: model weights), :func:`config` (a
scalar the receiver acts on) or :func:`metric` (a number or list of numbers the receiver
only records). :func:`encode` turns a message into Flower records
(``RecordDict``): tensors into the ``ArrayRecord`` ``"tensors"``, each state into an
``ArrayRecord`` named after its key, configs into the ``ConfigRecord`` ``"config"`` and
metrics into the ``MetricRecord`` ``"metrics"`` -- which is also Flower's own layout for
``FedAvg`` (``"arrays"`` + ``"config"`` down, ``"arrays"`` + ``"metrics"`` with
``"num-examples"`` up). :func:`decode` turns records back into the dataclass and
validates every field on receipt, raising :class:`WireError` naming the message and the
field, so a run never continues on a corrupt payload. Always checked:

* every declared field present (unless optional or defaulted), and nothing undeclared: no
  other record, tensor, state, config or metric key (replies may also carry the
  transport's own finite numbers, :data:`TRANSPORT_METRICS`);
* tensors: the declared dtype and rank, at least one element (no empty batch), no NaN or Inf;
* states: the declared dtype, no NaN or Inf;
* configs and metrics: the declared type, no NaN or Inf (in lists too);
* the message's own ``check()`` (e.g. fields that share a batch size).

What depends on the receiver's model (trailing shapes, the timestep range, the names and
shapes of a state dict) the receiver passes as an :class:`Expect`, checked where given (the
strategies build theirs from their own models: a server's ``reply_expect``, a client's
``request_expect``).

Bytes on the wire (:func:`record_nbytes`) are the serialised sizes Flower ships: each
array's buffer (NumPy ``.npy`` bytes, header included), 8 bytes per number and the
UTF-8 length of each string.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

TENSORS = "tensors"
CONFIG = "config"
METRICS = "metrics"


FEATURE_DTYPES = (torch.float32, torch.float16)  # sent features: fp32, or fp16 under wire quantisation
# metrics the transport adds to every reply beyond its message's fields (sim.engine.client_app: the
# handler's seconds and the process's peak memory, sim.engine.transcript.CLIENT_S / CLIENT_PEAK_MB)
TRANSPORT_METRICS = frozenset({"client-s", "client-peak-mb", "client-setup-s"})


class WireError(ValueError):
    """A payload that does not match its declared message type."""


class ClientTimeout(TimeoutError):
    """A client did not reply in time (an OSError: the CLI reports it and exits 2)."""


class ClientFailure(ConnectionError):
    """A client failed (an error reply), or too many did for a strategy to go on (CLI: exit 2)."""


@dataclass(frozen=True)
class Spec:
    """How one field travels: kind (tensor | state | config | metric), record key, dtype, rank."""

    kind: str
    key: str | None = None  # record key; default: the field name
    dtype: Any = None  # torch dtype (tensor, state) or python type(s) (config, metric)
    ndim: int | None = None  # tensors: required rank
    optional: bool = False


def tensor(dtype, ndim: int, optional: bool = False, key: str | None = None):
    """A tensor field of fixed dtype (or a tuple of allowed dtypes) and rank (``optional``: may be
    None and is then not sent)."""
    return field(default=None if optional else dataclasses.MISSING,
                 metadata={"wire": Spec("tensor", key, dtype, ndim, optional)})


def state(dtype: torch.dtype | None = None, optional: bool = False, key: str | None = None):
    """A dict of named tensors (model weights); ``dtype`` None allows any (buffers may be ints)."""
    return field(default=None if optional else dataclasses.MISSING,
                 metadata={"wire": Spec("state", key, dtype, None, optional)})


def config(typ, default=dataclasses.MISSING, key: str | None = None):
    """A scalar the receiver acts on (int, float, bool or str)."""
    return field(default=default, metadata={"wire": Spec("config", key, typ)})


def metric(typ, default=dataclasses.MISSING, key: str | None = None):
    """A number (or list of floats) the receiver records, e.g. losses and sample counts."""
    return field(default=default, metadata={"wire": Spec("metric", key, typ)})


def _specs(cls) -> list[tuple[str, Spec]]:
    return [(f.name, f.metadata["wire"]) for f in dataclasses.fields(cls)]


@dataclass(frozen=True)
class Expect:
    """What the receiver's own model fixes about a message, checked by :func:`decode` where given.

    Parameters
    ----------
    shapes : tensor field -> its trailing shape (the last ``len(shape)`` sizes; None: any size there)
    ranges : tensor field -> (low, high): every value in [low, high) (timesteps: (0, T))
    states : state field -> {name: shape}: exactly these tensors (the model's ``state_dict``, :func:`shapes_of`)
    """

    shapes: Mapping[str, tuple[int | None, ...]] = field(default_factory=dict)
    ranges: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    states: Mapping[str, Mapping[str, tuple[int, ...]]] = field(default_factory=dict)

    def check_against(self, cls) -> None:
        """Raise TypeError unless every name is a field of ``cls`` of the right kind (a stale expectation)."""
        specs = dict(_specs(cls))
        for what, names, kind in (("shapes", self.shapes, "tensor"), ("ranges", self.ranges, "tensor"),
                                  ("states", self.states, "state")):
            for n in names:
                if n not in specs or specs[n].kind != kind:
                    raise TypeError(f"Expect.{what}[{n!r}]: {cls.__name__} has no {kind} field {n!r}")
        for n, shape in self.shapes.items():
            if specs[n].ndim is not None and len(shape) > specs[n].ndim:
                raise TypeError(f"Expect.shapes[{n!r}] = {shape} has more dims than {cls.__name__}.{n} "
                                f"({specs[n].ndim})")


def shapes_of(sd: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape in a state dict (for :attr:`Expect.states`)."""
    return {k: tuple(v.shape) for k, v in sd.items()}


# ----------------------------------------------------------------------------- encode
def encode(msg) -> RecordDict:
    """A typed message as Flower records (tensors are copied out of autograd: nothing links the sides)."""
    tensors: dict[str, torch.Tensor] = {}
    out: dict[str, Any] = {}
    cfg: dict[str, Any] = {}
    metrics: dict[str, Any] = {}
    for name, spec in _specs(type(msg)):
        value = getattr(msg, name)
        key = spec.key or name
        if value is None and spec.kind in ("tensor", "state"):
            continue
        if spec.kind == "tensor":
            tensors[key] = value.detach()
        elif spec.kind == "state":
            out[key] = ArrayRecord(torch_state_dict={k: v.detach() for k, v in value.items()})
        elif spec.kind == "config":
            cfg[key] = value
        else:
            metrics[key] = value
    if tensors:
        out[TENSORS] = ArrayRecord(torch_state_dict=tensors)
    if cfg:
        out[CONFIG] = ConfigRecord(cfg)
    if metrics:
        out[METRICS] = MetricRecord(metrics)
    return RecordDict(out)


# ----------------------------------------------------------------------------- decode
def _fail(cls, name: str, why: str):
    raise WireError(f"{cls.__name__}.{name}: {why}")


def _check_tensor(cls, name: str, t: torch.Tensor, dtype, ndim: int | None) -> torch.Tensor:
    allowed = dtype if isinstance(dtype, tuple) else (dtype,)
    if dtype is not None and t.dtype not in allowed:
        _fail(cls, name, f"dtype {t.dtype}, expected {' or '.join(map(str, allowed))}")
    if ndim is not None and t.ndim != ndim:
        _fail(cls, name, f"shape {tuple(t.shape)} has {t.ndim} dims, expected {ndim}")
    if t.is_floating_point() and not torch.isfinite(t).all():
        bad = int((~torch.isfinite(t)).sum())
        _fail(cls, name, f"{bad} of {t.numel()} values are NaN or Inf")
    return t


def _check_expected(cls, name: str, t: torch.Tensor, expect: Expect) -> None:
    shape = expect.shapes.get(name)
    if shape:
        tail = tuple(t.shape)[-len(shape):]
        if len(tail) != len(shape) or any(w is not None and g != w for g, w in zip(tail, shape)):
            want = ", ".join("*" if w is None else str(w) for w in shape)
            _fail(cls, name, f"shape {tuple(t.shape)}, expected trailing shape (..., {want})")
    if name in expect.ranges:
        low, high = expect.ranges[name]
        lo, hi = t.min().item(), t.max().item()
        if lo < low or hi >= high:
            _fail(cls, name, f"values in [{lo}, {hi}], expected in [{low}, {high})")


def _check_state(cls, name: str, sd: dict[str, torch.Tensor], want: Mapping[str, tuple[int, ...]]) -> None:
    missing, unexpected = [k for k in want if k not in sd], [k for k in sd if k not in want]
    if missing or unexpected:
        def some(keys):
            return f"{keys[:3]}" + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")
        _fail(cls, name, f"keys differ from the model's: missing {some(missing)}, unexpected {some(unexpected)}")
    for k, v in sd.items():
        if tuple(v.shape) != tuple(want[k]):
            _fail(cls, f"{name}[{k!r}]", f"shape {tuple(v.shape)}, expected {tuple(want[k])}")


def _check_number(cls, name: str, value) -> None:
    values = value if isinstance(value, list) else [value]
    bad = sum(1 for v in values if isinstance(v, float) and not np.isfinite(v))
    if bad:
        _fail(cls, name, f"{value} is not finite" if not isinstance(value, list)
              else f"{bad} of {len(values)} values are NaN or Inf")


def _check_layout(content: RecordDict, cls, tensors: dict, cfg, metrics) -> None:
    """Nothing undeclared: no other record, tensor, state, config or metric key than ``cls`` declares."""
    keys = {kind: set() for kind in ("tensor", "state", "config", "metric")}
    for name, spec in _specs(cls):
        keys[spec.kind].add(spec.key or name)
    for rec in content.array_records:
        if rec != TENSORS and rec not in keys["state"]:
            _fail(cls, rec, f"not a field of {cls.__name__} (an undeclared array record)")
    for rec in list(content.config_records) + list(content.metric_records):
        if rec not in (CONFIG, METRICS):
            _fail(cls, rec, f"not a field of {cls.__name__} (an undeclared record)")
    for got, kind in ((tensors, "tensor"), (cfg, "config"), (metrics, "metric")):
        allowed = keys[kind] | (TRANSPORT_METRICS if kind == "metric" else set())
        for k in got:
            if k not in allowed:
                _fail(cls, k, f"not a field of {cls.__name__} (an undeclared {kind})")
    for k in TRANSPORT_METRICS & set(metrics) - keys["metric"]:
        v = metrics[k]
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            _fail(cls, k, f"{type(v).__name__} {v!r}, expected a number")
        _check_number(cls, k, v)


def _array_dict(record: ArrayRecord) -> dict[str, torch.Tensor]:
    # ArrayRecord.to_torch_state_dict copies; from_numpy over the deserialised array avoids a second copy
    return {k: torch.from_numpy(np.ascontiguousarray(a.numpy())) for k, a in record.items()}


def decode(content: RecordDict, cls, expect: Expect | None = None):
    """Records back into a ``cls`` message, every field validated (raises :class:`WireError`).

    Parameters
    ----------
    content : the received records
    cls : the message class they must be
    expect : what the receiver's model fixes about them (trailing shapes, value ranges, state
        names and shapes); None checks only what ``cls`` declares
    """
    if expect is not None:
        expect.check_against(cls)
    tensors = _array_dict(content.array_records[TENSORS]) if TENSORS in content.array_records else {}
    cfg = content.config_records.get(CONFIG, ConfigRecord())
    metrics = content.metric_records.get(METRICS, MetricRecord())
    _check_layout(content, cls, tensors, cfg, metrics)
    kwargs = {}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name, spec in _specs(cls):
        key = spec.key or name
        if spec.kind == "tensor":
            if key not in tensors:
                if not spec.optional:
                    _fail(cls, name, "missing")
                continue
            t = _check_tensor(cls, name, tensors[key], spec.dtype, spec.ndim)
            if t.numel() == 0:
                _fail(cls, name, f"empty: shape {tuple(t.shape)}")
            if expect is not None:
                _check_expected(cls, name, t, expect)
            kwargs[name] = t
        elif spec.kind == "state":
            if key not in content.array_records:
                if not spec.optional:
                    _fail(cls, name, "missing")
                continue
            sd = _array_dict(content.array_records[key])
            if expect is not None and name in expect.states:
                _check_state(cls, name, sd, expect.states[name])
            kwargs[name] = {k: _check_tensor(cls, f"{name}[{k!r}]", v, spec.dtype, None) for k, v in sd.items()}
        else:
            rec = cfg if spec.kind == "config" else metrics
            if key not in rec:
                if fields[name].default is dataclasses.MISSING:
                    _fail(cls, name, "missing")
                continue
            value = rec[key]
            if not isinstance(value, spec.dtype) or (spec.dtype in (int, float) and isinstance(value, bool)):
                _fail(cls, name, f"{type(value).__name__} {value!r}, expected {spec.dtype}")
            _check_number(cls, name, value)
            kwargs[name] = value
    msg = cls(**kwargs)
    check = getattr(msg, "check", None)
    if check is not None:
        try:
            check()
        except ValueError as e:
            raise WireError(f"{cls.__name__}: {e}") from None
    return msg


def same_leading_dims(msg, names: list[str], dims: int) -> None:
    """Raise ValueError unless the named tensor fields share their first ``dims`` sizes."""
    ref = None
    for n in names:
        t = getattr(msg, n)
        if t is None:
            continue
        lead = tuple(t.shape[:dims])
        if ref is None:
            ref = (n, lead)
        elif lead != ref[1]:
            raise ValueError(f"{n} has leading shape {lead} but {ref[0]} has {ref[1]}")


# ----------------------------------------------------------------------------- size
def record_nbytes(content: RecordDict, skip: tuple[str, ...] = ()) -> int:
    """Serialised size of a message's records: array buffers, 8 bytes per number, string lengths."""
    total = 0
    for name, rec in content.array_records.items():
        if name not in skip:
            total += sum(len(a.data) for a in rec.values())
    for records in (content.config_records, content.metric_records):
        for name, rec in records.items():
            if name in skip:
                continue
            for v in rec.values():
                if isinstance(v, (str, bytes)):
                    total += len(v)
                elif isinstance(v, list):
                    total += sum(len(x) if isinstance(x, (str, bytes)) else 8 for x in v)
                else:
                    total += 8
    return total

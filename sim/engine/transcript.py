"""One transcript of everything that crosses between the server and the clients.

Every scheme's messages go through :class:`RecordingGrid`, a Flower ``Grid`` that wraps
the real one (in-process, Ray simulation or Deployment Engine) and writes one
:class:`MessageStat` per round trip into a :class:`Transcript`: the client, the message
type, the training steps the message serves, the serialised bytes each way, and the
client's own compute time and peak memory (which the client reports in its reply's
metrics). A reply that carries an error stops the run with that error, naming the client.

What the server saw
-------------------
The transcript also keeps the records themselves (what the server sent and what it
received) for the first ``keep`` round trips (or the last ones). Attacks (a later issue) read only these
and the declared public knowledge, never the clients' data. ``keep=0`` (the default of a
plain ``compare``) keeps statistics only; a no-gradient-return run ships ~1.4 MB per
step, so keeping a whole run in memory is a choice, not a default.
"""
from __future__ import annotations

import dataclasses
import resource
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from sim.core.wire import METRICS, ClientFailure, ClientTimeout, record_nbytes

CLIENT_S = "client-s"  # reply metric: seconds the client spent in its handler
CLIENT_PEAK_MB = "client-peak-mb"  # reply metric: the client process's peak resident memory so far (MiB)
CLIENT_SETUP_S = "client-setup-s"  # reply metric: seconds spent building the client (models, data) before serving


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@dataclass
class MessageStat:
    """One round trip: request down to a client, reply up."""

    index: int
    round: int  # a FedAvg round, or one client's turn in split learning (numbered from 1)
    scheme: str
    client: int  # partition id
    message_type: str
    first_step: int  # the training steps this message serves: [first_step, first_step + num_steps)
    num_steps: int
    bytes_down: int
    bytes_up: int
    client_s: float
    client_peak_mb: float
    round_trip_s: float
    client_setup_s: float = 0.0  # building the client's models and data (a fresh process: its start-up)


@dataclass
class Transcript:
    """Per-message statistics of a run and, for the first (or, with ``keep_last``, the last)
    ``keep`` round trips, the records."""

    keep: int = 0
    keep_last: bool = False
    stats: list[MessageStat] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)  # replies a tolerant strategy went on without
    seen: list[tuple[MessageStat, RecordDict, RecordDict]] = field(default_factory=list)  # (stat, down, up)

    def add(self, stat: MessageStat, down: RecordDict, up: RecordDict) -> None:
        self.stats.append(stat)
        if self.keep_last and self.keep:
            self.seen = self.seen[-(self.keep - 1):] if self.keep > 1 else []
        if len(self.seen) < self.keep:
            self.seen.append((stat, down, up))

    # ------------------------------------------------------------------ totals
    @property
    def messages(self) -> int:
        return len(self.stats)

    @property
    def bytes_up(self) -> int:
        return sum(s.bytes_up for s in self.stats)

    @property
    def bytes_down(self) -> int:
        return sum(s.bytes_down for s in self.stats)

    @property
    def client_s(self) -> float:
        return sum(s.client_s for s in self.stats)

    @property
    def client_setup_s(self) -> float:
        return sum(s.client_setup_s for s in self.stats)

    @property
    def client_peak_mb(self) -> float:
        return max((s.client_peak_mb for s in self.stats), default=0.0)

    def per_step(self, steps: int) -> dict[str, list[float]]:
        """Bytes each way per training step, a message's bytes spread evenly over the steps it serves."""
        up, down = [0.0] * steps, [0.0] * steps
        for s in self.stats:  # a message serving no step (e.g. returning a head) counts for the nearest one
            first = min(s.first_step, steps - 1)
            n = max(1, min(s.num_steps, steps - first))
            for i in range(first, first + n):
                up[i] += s.bytes_up / n
                down[i] += s.bytes_down / n
        return {"bytes_up": up, "bytes_down": down}


class RecordingGrid(Grid):
    """A Flower ``Grid`` that passes messages to ``inner`` and records each round trip.

    ``partition_of`` maps node ids to partition ids (client numbers). The strategy sets
    :attr:`window` (first step, number of steps) before each send so that the
    transcript can attribute bytes to training steps, and :attr:`round` (the FedAvg round
    or the split-learning turn).
    """

    def __init__(self, inner: Grid, transcript: Transcript, partition_of: dict[int, int], scheme: str = "",
                 timeout: float | None = None):
        self.inner = inner
        self.transcript = transcript
        self.partition_of = dict(partition_of)
        self.scheme = scheme
        self.timeout = timeout  # seconds per call at most (``message-timeout``); None: the caller's
        self.tolerate = False  # set by a strategy that goes on without failed clients (Channel.tolerate_failures)
        self.window = (0, 0)
        self.round = 0

    def _drop_failures(self, by_node: dict, replies: list[Message], timeout) -> list[Message]:
        """Tolerant mode: record each missing or failed reply in the transcript and keep the others."""
        got = {r.metadata.src_node_id: r for r in replies}
        for node, req in by_node.items():
            r = got.get(node)
            if r is None or r.has_error():
                reason = f"no reply within {timeout:g} s" if r is None else r.error.reason
                self.transcript.failures.append({"round": self.round, "scheme": self.scheme,
                                                 "client": self.partition_of.get(node, -1),
                                                 "message_type": req.metadata.message_type, "reason": reason})
                got.pop(node, None)
        return list(got.values())

    # the abstract Grid interface, delegated
    def set_run(self, run) -> None:
        self.inner.set_run(run)

    @property
    def run(self):
        return self.inner.run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.partition_of)

    def push_messages(self, messages):
        raise NotImplementedError("RecordingGrid records round trips: use send_and_receive")

    def pull_messages(self, message_ids):
        raise NotImplementedError("RecordingGrid records round trips: use send_and_receive")

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        by_node = {m.metadata.dst_node_id: m for m in messages}
        if len(by_node) != len(messages):
            raise ValueError("RecordingGrid sends at most one message per node per call")
        if self.timeout is not None:
            timeout = self.timeout if timeout is None else min(timeout, self.timeout)
        t0 = time.perf_counter()
        if self.tolerate and hasattr(self.inner, "errors_as_replies"):  # in-process: an exception is a failed reply
            self.inner.errors_as_replies = True
        replies = list(self.inner.send_and_receive(messages, timeout=timeout))
        elapsed = time.perf_counter() - t0
        if self.tolerate:  # the failed ones are recorded and dropped; the strategy decides whether to go on
            replies = self._drop_failures(by_node, replies, timeout)
            if not replies:
                return []
        elif len(replies) != len(messages):
            got = {r.metadata.src_node_id for r in replies}
            missing = sorted(self.partition_of.get(n, n) for n in by_node if n not in got)
            raise ClientTimeout(f"{self.scheme}: no reply from client(s) {missing} (round {self.round}) within "
                                f"{timeout:g} s; raise message-timeout if they are only slow")
        replies.sort(key=lambda r: self.partition_of.get(r.metadata.src_node_id, 0))  # deterministic order
        first, n = self.window
        for r in replies:
            node = r.metadata.src_node_id
            cid = self.partition_of.get(node, -1)
            if r.has_error():
                raise ClientFailure(f"{self.scheme}: client {cid} (node {node}) failed on "
                                    f"{by_node[node].metadata.message_type!r}: {r.error.reason}")
            req = by_node[node]
            m = r.content.metric_records.get(METRICS, {})
            stat = MessageStat(len(self.transcript.stats), self.round, self.scheme, cid, req.metadata.message_type,
                               first, n, record_nbytes(req.content), record_nbytes(r.content),
                               float(m.get(CLIENT_S, 0.0)), float(m.get(CLIENT_PEAK_MB, 0.0)),
                               elapsed / len(replies), float(m.get(CLIENT_SETUP_S, 0.0)))
            self.transcript.add(stat, req.content, r.content)
        return replies


# ----------------------------------------------------------------------------- what the server saw, on disk
def record_to_dict(content: RecordDict) -> dict:
    """Flower records as plain Python: array records as {name: tensor}, config/metric records as dicts."""
    out: dict = {}
    for key, rec in content.array_records.items():
        out[key] = {k: torch.from_numpy(np.ascontiguousarray(a.numpy())) for k, a in rec.items()}
    for key, rec in list(content.config_records.items()) + list(content.metric_records.items()):
        out[key] = dict(rec)
    return out


def save_seen(transcript: Transcript, path) -> int:
    """Write the kept round trips (what the server sent and received) for attacks; returns how many."""
    seen = [{"stat": dataclasses.asdict(stat), "down": record_to_dict(down), "up": record_to_dict(up)}
            for stat, down, up in transcript.seen]
    torch.save(seen, path)
    return len(seen)

"""Wall-clock of a training run: an event-driven simulation of each scheme's protocol on modelled machines.

What it needs: a :class:`Workload` per scheme (seconds of client and server compute per
sample, bytes per sample and per message, the weights relayed per turn or round), a
:class:`Network` (uplink/downlink bandwidth per client, the server's link, round-trip
time, a per-message framework cost) and a plan of turns (:func:`epoch_plan`, or a run's
own turn schedule). It knows nothing of torch or of the schemes' code: each scheme declares
its ``concurrency`` (``strategies/<name>.py``) and this module has one process per kind:

``rounds`` (FedAvg)
    every client of a round in parallel: download the model, train its turn, upload; the
    server waits for all of them (synchronous rounds), then aggregates.
``sequential`` (vanilla split learning)
    one client at a time; each training step is a round trip (client forward, features up,
    server step, gradient down, client backward), the gradient of step i riding on the
    request for step i+1 (k + 1 round trips per turn of k steps, as the code does); the head
    is relayed once per turn.
``parallel-split`` (SplitFed)
    vanilla's round trips from every client of a round at once, the server serving their
    steps first come first served on one model; heads down at the start of a round, up at
    its end.
``stream`` (no-gradient-return split learning)
    every client computes its turns and streams them into the server's queue; nothing
    returns but an 8-byte request, issued as a credit so each client keeps ``window`` turns
    in flight (it computes turn i+1 while the server trains turn i). Server-bound or
    uplink-bound, whichever saturates first.

Resources are first-come-first-served servers (one client device, uplink and downlink
per client; one server device, ingress and egress link). A message occupies the client's
link and the server's link at the same time (cut-through: it takes as long as the slower
of the two, queued behind earlier messages on each), then arrives after half the
round-trip time and the per-message framework cost. ``shared=True`` puts every device on
one processor and charges the framework cost to it: one machine running the in-process
grid, which is how the validation predicts a run on this machine.

What is not modelled: compute that overlaps communication on one device, stragglers and
failures, partial batches being cheaper than linear, aggregation and optimizer time
(element-wise, small next to the convolutions), protocol overhead beyond the per-message
cost, and memory limits (reported, not enforced, by the command).
"""
from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass, field, replace


# ----------------------------------------------------------------------------- a small event engine
class Env:
    """Simulated time and a heap of callbacks, run in time order (ties in scheduling order)."""

    def __init__(self):
        self.now = 0.0
        self._heap: list = []
        self._n = 0

    def at(self, t: float, fn) -> None:
        heapq.heappush(self._heap, (t, self._n, fn))
        self._n += 1

    def run(self) -> None:
        while self._heap:
            self.now, _, fn = heapq.heappop(self._heap)
            fn()

    def event(self) -> Event:
        return Event(self)

    def timeout_at(self, t: float) -> Event:
        ev = Event(self)
        self.at(max(t, self.now), ev.succeed)
        return ev

    def process(self, gen) -> Event:
        """Run a generator that yields :class:`Event` s; the returned event fires when it ends."""
        done = Event(self)

        def step(value=None):
            try:
                ev = gen.send(value)
            except StopIteration as stop:
                done.succeed(stop.value)
                return
            ev.then(step)

        self.at(self.now, step)
        return done

    def all_of(self, events: list[Event]) -> Event:
        out, left = Event(self), [len(events)]
        if not events:
            self.at(self.now, out.succeed)

        def one(_):
            left[0] -= 1
            if left[0] == 0:
                out.succeed()

        for ev in events:
            ev.then(one)
        return out


class Event:
    def __init__(self, env: Env):
        self.env, self.done, self.value, self._waiters = env, False, None, []

    def succeed(self, value=None) -> None:
        self.done, self.value = True, value
        for fn in self._waiters:
            self.env.at(self.env.now, lambda fn=fn: fn(value))
        self._waiters = []

    def then(self, fn) -> None:
        if self.done:
            self.env.at(self.env.now, lambda: fn(self.value))
        else:
            self._waiters.append(fn)


class Resource:
    """A first-come-first-served server: a job asked for at time t starts when the previous ones end."""

    def __init__(self, env: Env, name: str):
        self.env, self.name, self.free_at, self.busy = env, name, 0.0, 0.0

    def reserve(self, duration: float) -> float:
        """Book ``duration`` seconds; returns when the job ends."""
        start = max(self.env.now, self.free_at)
        self.free_at = start + duration
        self.busy += duration
        return self.free_at

    def use(self, duration: float) -> Event:
        return self.env.timeout_at(self.reserve(duration))


class Store:
    """A queue: ``put`` an item, ``get`` an event that fires with the oldest one."""

    def __init__(self, env: Env):
        self.env, self.items, self.getters = env, deque(), deque()

    def put(self, item) -> None:
        if self.getters:
            self.getters.popleft().succeed(item)
        else:
            self.items.append(item)

    def get(self) -> Event:
        ev = self.env.event()
        if self.items:
            self.env.at(self.env.now, lambda: ev.succeed(self.items.popleft()))
        else:
            self.getters.append(ev)
        return ev


# ----------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class Workload:
    """One scheme's costs, per sample unless named otherwise (seconds on the modelled devices, bytes)."""

    scheme: str
    concurrency: str  # rounds | sequential | parallel-split | stream
    client_fwd_s: float  # client compute before its message goes up (all of it for rounds/stream)
    client_bwd_s: float = 0.0  # client compute after the gradient comes back (sequential/parallel-split)
    server_s: float = 0.0  # server compute per sample trained
    up_bytes: float = 0.0  # client -> server per sample per step
    down_bytes: float = 0.0  # server -> client per sample per step
    message_bytes: float = 0.0  # fixed bytes per message (headers, configs)
    relay_bytes: float = 0.0  # weights per turn (sequential) or round (rounds, parallel-split), each way
    server_round_s: float = 0.0  # server compute per round (aggregation), rounds only
    request_bytes: float = 8.0  # the stream scheme's request


@dataclass(frozen=True)
class Network:
    """Links: per-client uplink/downlink (bytes/s), the server's link each way (bytes/s), latency, framework cost."""

    up_Bps: float
    down_Bps: float
    rtt_s: float = 0.0
    server_Bps: float = math.inf
    message_s: float = 0.0  # framework cost per round trip (serialisation, dispatch)
    shared: bool = False  # every device is one processor (the in-process grid on one machine)


@dataclass(frozen=True)
class Turn:
    """``batches`` training steps of client ``client``, ``samples`` samples in all."""

    client: int
    batches: int
    samples: float


def epoch_plan(samples: int, num_clients: int, batch_size: int, local_steps: int) -> list[Turn]:
    """One pass over every client's data (equal shares), in turns of ``local_steps`` batches, clients cycling."""
    share = samples / num_clients
    batches = max(1, math.ceil(share / batch_size))
    per_client = []
    for done in range(0, batches, local_steps):
        k = min(local_steps, batches - done)
        per_client.append((k, share * k / batches))
    return [Turn(c, k, s) for k, s in per_client for c in range(num_clients)]


def plan_from_turns(turns: list[tuple[int, int]], batch_size: int) -> list[Turn]:
    """A run's own turn schedule ((client, steps) pairs, :func:`strategies.base.turn_schedule`)."""
    return [Turn(c, k, k * batch_size) for c, k in turns]


def rounds_of(plan: list[Turn], num_clients: int) -> list[list[Turn]]:
    """Consecutive turns, one per client: the rounds of the synchronous schemes."""
    return [plan[i:i + num_clients] for i in range(0, len(plan), num_clients)]


# ----------------------------------------------------------------------------- the cluster
@dataclass
class Cluster:
    env: Env
    num_clients: int
    net: Network
    client: list = field(default_factory=list)
    up: list = field(default_factory=list)
    down: list = field(default_factory=list)
    server: Resource | None = None
    ingress: Resource | None = None
    egress: Resource | None = None
    messages: int = 0
    bytes_up: list = field(default_factory=list)
    bytes_down: list = field(default_factory=list)

    @classmethod
    def build(cls, num_clients: int, net: Network) -> Cluster:
        env = Env()
        c = cls(env, num_clients, net)
        c.server = Resource(env, "server")
        c.client = [c.server if net.shared else Resource(env, f"client {i}") for i in range(num_clients)]
        c.up = [Resource(env, f"uplink {i}") for i in range(num_clients)]
        c.down = [Resource(env, f"downlink {i}") for i in range(num_clients)]
        c.ingress, c.egress = Resource(env, "server ingress"), Resource(env, "server egress")
        c.bytes_up, c.bytes_down = [0.0] * num_clients, [0.0] * num_clients
        return c

    def send(self, cid: int, nbytes: float, up: bool) -> Event:
        """One message; arrives after both links carried it and half a round trip."""
        net = self.net
        if up:
            self.bytes_up[cid] += nbytes
            t = max(self.up[cid].reserve(nbytes / net.up_Bps), self.ingress.reserve(nbytes / net.server_Bps))
        else:
            self.bytes_down[cid] += nbytes
            t = max(self.down[cid].reserve(nbytes / net.down_Bps), self.egress.reserve(nbytes / net.server_Bps))
        return self.env.timeout_at(t + net.rtt_s / 2)

    def rpc(self, cid: int, down_bytes: float, work_s: float, up_bytes: float):
        """A round trip: request down, ``work_s`` on the client, reply up (a generator to ``yield from``)."""
        self.messages += 1
        if self.net.message_s:
            # the framework's cost per round trip: on the one processor, or as a delay between machines
            yield self.server.use(self.net.message_s) if self.net.shared else self.env.timeout_at(
                self.env.now + self.net.message_s)
        yield self.send(cid, down_bytes, up=False)
        if work_s:
            yield self.client[cid].use(work_s)
        yield self.send(cid, up_bytes, up=True)


# ----------------------------------------------------------------------------- one process per concurrency
def _rounds(cl: Cluster, w: Workload, plan: list[Turn]):
    relay = w.relay_bytes + w.message_bytes

    def client_round(t: Turn):
        yield from cl.rpc(t.client, relay, t.samples * (w.client_fwd_s + w.client_bwd_s), relay)

    for rnd in rounds_of(plan, cl.num_clients):
        yield cl.env.all_of([cl.env.process(client_round(t)) for t in rnd])
        if w.server_round_s:
            yield cl.server.use(w.server_round_s)


def _split_turn(cl: Cluster, w: Workload, t: Turn, head_down: bool, head_up: bool):
    """k steps of one client with gradient return: k + 1 round trips, the gradient riding on the next request."""
    s = t.samples / t.batches
    up = s * w.up_bytes + w.message_bytes
    grad = s * w.down_bytes + w.message_bytes
    yield from cl.rpc(t.client, w.message_bytes + (w.relay_bytes if head_down else 0.0), s * w.client_fwd_s, up)
    for i in range(t.batches):
        yield cl.server.use(s * w.server_s)
        last = i == t.batches - 1
        work = s * w.client_bwd_s + (0.0 if last else s * w.client_fwd_s)
        reply = (w.message_bytes + (w.relay_bytes if head_up else 0.0)) if last else up
        yield from cl.rpc(t.client, grad, work, reply)


def _sequential(cl: Cluster, w: Workload, plan: list[Turn]):
    for t in plan:
        yield from _split_turn(cl, w, t, head_down=True, head_up=True)


def _parallel_split(cl: Cluster, w: Workload, plan: list[Turn]):
    for rnd in rounds_of(plan, cl.num_clients):
        yield cl.env.all_of([cl.env.process(_split_turn(cl, w, t, True, True)) for t in rnd])


def _stream(cl: Cluster, w: Workload, plan: list[Turn], window: int = 2):
    env = cl.env
    queue = Store(env)
    credits = [Store(env) for _ in range(cl.num_clients)]
    mine = [[t for t in plan if t.client == c] for c in range(cl.num_clients)]

    def client(c: int):
        for t in mine[c]:
            yield credits[c].get()  # the server's request (sent below)
            yield cl.client[c].use(t.samples * (w.client_fwd_s + w.client_bwd_s))
            yield cl.send(c, t.samples * w.up_bytes + w.message_bytes, up=True)
            queue.put(t)

    def request(c: int):
        cl.messages += 1
        if cl.net.message_s:
            yield cl.server.use(cl.net.message_s) if cl.net.shared else env.timeout_at(env.now + cl.net.message_s)
        yield cl.send(c, w.request_bytes, up=False)
        credits[c].put(True)

    for c in range(cl.num_clients):
        for _ in range(min(window, len(mine[c]))):
            env.process(request(c))
        env.process(client(c))
    sent = [min(window, len(m)) for m in mine]
    for _ in plan:
        t = yield queue.get()
        if sent[t.client] < len(mine[t.client]):
            sent[t.client] += 1
            env.process(request(t.client))
        yield cl.server.use(t.samples * w.server_s)


PROCESSES = {"rounds": _rounds, "sequential": _sequential, "parallel-split": _parallel_split, "stream": _stream}


def simulate(w: Workload, net: Network, plan: list[Turn], num_clients: int) -> dict:
    """Run one scheme's plan; wall time, busy fractions, the bottleneck, messages and bytes per client."""
    if w.concurrency not in PROCESSES:
        raise ValueError(f"{w.scheme}: unknown concurrency {w.concurrency!r} (one of {', '.join(PROCESSES)})")
    cl = Cluster.build(num_clients, net)
    done = cl.env.process(PROCESSES[w.concurrency](cl, w, plan))
    cl.env.run()
    if not done.done:
        raise RuntimeError(f"{w.scheme}: the simulation stalled before the plan ended")
    wall = cl.env.now
    frac = (lambda r: r.busy / wall) if wall > 0 else (lambda r: 0.0)
    clients = sorted({id(r): r for r in cl.client}.values(), key=lambda r: r.name)
    busy = {
        "server": frac(cl.server),
        "client": 0.0 if net.shared else sum(frac(r) for r in clients) / len(clients),
        "uplink": sum(frac(r) for r in cl.up) / num_clients,
        "downlink": sum(frac(r) for r in cl.down) / num_clients,
        "server ingress": frac(cl.ingress),
        "server egress": frac(cl.egress),
    }
    return {
        "scheme": w.scheme, "concurrency": w.concurrency, "clients": num_clients,
        "wall_s": wall, "client_busy": busy["client"], "server_busy": busy["server"],
        "uplink_busy": busy["uplink"], "server_ingress_busy": busy["server ingress"],
        "messages": cl.messages, "steps": sum(t.batches for t in plan),
        "up_bytes_per_client": sum(cl.bytes_up) / num_clients,
        "down_bytes_per_client": sum(cl.bytes_down) / num_clients,
    }


FREE = ("client compute", "server compute", "bandwidth", "latency")


def wall_if_free(w: Workload, net: Network, plan: list[Turn], num_clients: int) -> dict[str, float]:
    """The wall time with one cost class made free (instant compute, infinite links, no latency): what limits
    the run is the class whose removal saves the most."""
    inf = math.inf
    variants = {
        "client compute": (replace(w, client_fwd_s=0.0, client_bwd_s=0.0), net),
        "server compute": (replace(w, server_s=0.0, server_round_s=0.0), net),
        "bandwidth": (w, replace(net, up_Bps=inf, down_Bps=inf, server_Bps=inf)),
        "latency": (w, replace(net, rtt_s=0.0, message_s=0.0)),
    }
    return {k: simulate(wv, nv, plan, num_clients)["wall_s"] for k, (wv, nv) in variants.items()}


def bottleneck(wall_s: float, if_free: dict[str, float]) -> str:
    """The cost class whose removal shortens the run the most (``none`` if none saves 1%)."""
    best = min(if_free, key=if_free.get)
    return best if if_free[best] < 0.99 * wall_s else "none"

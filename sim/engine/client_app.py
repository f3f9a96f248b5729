"""The Flower ClientApp: one app serves every registered scheme's clients.

Message types: each scheme's own (``train`` for FedAvg, from Flower's own strategy;
``query.<name>`` for the others: the registry in strategies/ decides, so a new scheme
needs no line here) and ``query.hello`` (the server asks a node for its partition id,
since node ids are random per run). For each message the app builds the client from its
:class:`strategies.base.ClientEnv`: the frozen public model and the public recipe (from
the run config), its own data partition and its client seed (from the node config:
``partition-id``, and the client-side ``data-seed`` and ``client-seed``; a node without a
``client-seed`` draws one on its first message and keeps it in its own state, so it never
leaves the node). It restores what must outlive a message from ``context.state``, decodes
and validates the request (:mod:`sim.core.wire`; against what the client's own models fix
about it, ``request_expect``), serves it, saves the state back and
replies. So the app also works where every message runs in a fresh process (Flower's
Deployment Engine). Replies carry three extra metrics: ``client-s`` (seconds of the
handler's own compute), ``client-setup-s`` (seconds building its models and data first: a
fresh process's start-up under the Deployment Engine, ~0 where they are cached) and
``client-peak-mb`` (the process's peak RSS).

``make_client_app(env_fn)`` builds the app around another environment (tests use tiny
random models); ``app`` is the one ``flwr run`` loads (see pyproject.toml).
"""
from __future__ import annotations

import functools
import time
from collections.abc import Callable

from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp

from sim.core.config import ExperimentConfig, PublicConfig, from_run_config
from sim.core.wire import METRICS, decode, encode
from sim.engine.clientside import draw_client_seed, from_node_config
from sim.engine.context import check_components, context_for
from sim.engine.transcript import CLIENT_PEAK_MB, CLIENT_S, CLIENT_SETUP_S, peak_rss_mb
from strategies import SCHEMES, get_strategy

HELLO = "hello"
STATE_KEY = "{scheme}.client"
SECRET_KEY = "client-secret"  # a node's own client seed, when its node config gives none


def partition_id(context: Context) -> int:
    try:
        return int(context.node_config["partition-id"])
    except KeyError:
        raise ValueError("this node has no 'partition-id' in its node config; start it with "
                         "--node-config \"partition-id=<i> num-partitions=<n>\"") from None


@functools.lru_cache(maxsize=8)
def _public(run_config: frozenset):
    return check_components(from_run_config(dict(run_config)))


def client_config(context: Context, public: PublicConfig | None = None) -> ExperimentConfig:
    """This node's whole configuration: the public run config (or ``public``) plus its client-side keys."""
    public = public or _public(frozenset(context.run_config.items()))
    keys = from_node_config(context.node_config)
    if "client_seed" not in keys:  # drawn once, kept in the node's own state (never sent)
        if SECRET_KEY not in context.state.config_records:
            context.state[SECRET_KEY] = ConfigRecord({"client-seed": draw_client_seed()})
        keys["client_seed"] = int(context.state.config_records[SECRET_KEY]["client-seed"])
    return ExperimentConfig.from_public(public, **keys)


def env_from_run_config(context: Context, public: PublicConfig | None = None):
    """The client's environment from the run config (or ``public``), its node config and its partition id."""
    cfg = client_config(context, public)
    return context_for(cfg).client_env(cfg, partition_id(context))


def serve(msg: Message, context: Context, scheme: str, env_fn: Callable) -> Message:
    """Build the scheme's client, restore its state, answer the request, save the state.

    ``client-setup-s``: building the environment (models and data: in a fresh process, as the
    Deployment Engine starts for each message, its start-up; cached within a process);
    ``client-s``: everything after it, the handler's own compute."""
    t_setup = time.perf_counter()
    env = env_fn(context)
    t0 = time.perf_counter()
    cls = get_strategy(scheme).client_class
    client = cls(partition_id(context), env)
    key = STATE_KEY.format(scheme=scheme)
    if key in context.state.array_records:
        client.set_state(context.state.array_records[key].to_torch_state_dict())
    reply = client.serve(decode(msg.content, cls.request_type, client.request_expect()))
    context.state[key] = ArrayRecord(torch_state_dict=client.get_state())
    content = encode(reply)
    metrics = content.metric_records.get(METRICS, MetricRecord())
    metrics[CLIENT_S] = time.perf_counter() - t0
    metrics[CLIENT_SETUP_S] = t0 - t_setup
    metrics[CLIENT_PEAK_MB] = peak_rss_mb()
    content[METRICS] = metrics
    return Message(content, reply_to=msg)


def client_app_for(envs: list) -> ClientApp:
    """A ClientApp whose client with partition id i lives in ``envs[i]`` (tests, benchmarks)."""
    return make_client_app(lambda context: envs[partition_id(context)])


def make_client_app(env_fn: Callable[[Context], object] = env_from_run_config) -> ClientApp:
    """A ClientApp whose clients live in ``env_fn(context)``: a handler per registered scheme."""
    app = ClientApp()

    def handler(scheme: str):
        return lambda msg, context: serve(msg, context, scheme, env_fn)

    for name, cls in SCHEMES.items():
        kind, _, query = cls.message_type.partition(".")
        if kind == "train":
            app.train()(handler(name))
        elif kind == "query" and query:
            app.query(query)(handler(name))
        else:
            raise ValueError(f"scheme {name!r}: message type {cls.message_type!r} is neither 'train' nor 'query.<name>'")

    @app.query(HELLO)
    def hello(msg: Message, context: Context) -> Message:
        return Message(RecordDict({"config": ConfigRecord({"partition-id": partition_id(context)})}), reply_to=msg)

    return app


app = make_client_app()

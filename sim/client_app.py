"""The Flower ClientApp: one app serves every scheme's clients.

Message types: ``train`` (FedAvg, from Flower's own strategy), ``query.vanilla`` and
``query.nograd`` (our split-learning strategies), and ``query.hello`` (the server asks a
node for its partition id, since node ids are random per run). For each message the
app builds the client from its :class:`strategies.base.ClientEnv` (the frozen base
model, the recipe and the client's own data partition, all derived from the run config
and ``node_config["partition-id"]``), restores what must outlive a message from
``context.state``, decodes and validates the request (:mod:`sim.wire`), serves it,
saves the state back and replies. So the app also works where every message runs in a
fresh process (Flower's Deployment Engine). Replies carry two extra metrics:
``client-s`` (seconds in the handler) and ``client-peak-mb`` (the process's peak RSS).

``make_client_app(env_fn)`` builds the app around another environment (tests use tiny
random models); ``app`` is the one ``flwr run`` loads (see pyproject.toml).
"""
from __future__ import annotations

import functools
import time
from collections.abc import Callable

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from .transcript import CLIENT_PEAK_MB, CLIENT_S, peak_rss_mb
from .wire import METRICS, decode, encode

HELLO = "hello"
STATE_KEY = "{scheme}.client"


def partition_id(context: Context) -> int:
    try:
        return int(context.node_config["partition-id"])
    except KeyError:
        raise ValueError("this node has no 'partition-id' in its node config; start it with "
                         "--node-config \"partition-id=<i> num-partitions=<n>\"") from None


@functools.lru_cache(maxsize=2)
def _shared(cfg):
    """The frozen public model and every client's data for a config (cached per process)."""
    from .compare import client_datasets
    from .models import build_controlnet, configure_torch, ddpm_scheduler, load_base

    configure_torch(cfg.threads)
    base = load_base(cfg.model, folder=cfg.base_model or None)
    clients, _ = client_datasets(cfg, base.preset.image_size)
    return base, ddpm_scheduler(base.preset), clients, build_controlnet(base.unet, base.preset)


def env_from_run_config(context: Context):
    """The client's environment from the run config and its partition id."""
    from strategies.base import ClientEnv, TrainSettings

    from .config import from_run_config

    cfg = from_run_config(context.run_config)
    base, sched, clients, template = _shared(cfg)
    pid = partition_id(context)
    if pid >= len(clients):
        raise ValueError(f"partition-id={pid} but the run has num-clients={len(clients)}")
    return ClientEnv(base, sched, TrainSettings.from_config(cfg), clients[pid], cfg.seed, template)


def serve(msg: Message, context: Context, scheme: str, env_fn: Callable) -> Message:
    """Build the scheme's client, restore its state, answer the request, save the state."""
    from strategies import get_strategy

    t0 = time.perf_counter()
    cls = get_strategy(scheme).client_class
    client = cls(partition_id(context), env_fn(context))
    key = STATE_KEY.format(scheme=scheme)
    if key in context.state.array_records:
        client.set_state(context.state.array_records[key].to_torch_state_dict())
    reply = client.serve(decode(msg.content, cls.request_type))
    context.state[key] = ArrayRecord(torch_state_dict=client.get_state())
    content = encode(reply)
    metrics = content.metric_records.get(METRICS, MetricRecord())
    metrics[CLIENT_S] = time.perf_counter() - t0
    metrics[CLIENT_PEAK_MB] = peak_rss_mb()
    content[METRICS] = metrics
    return Message(content, reply_to=msg)


def client_app_for(envs: list) -> ClientApp:
    """A ClientApp whose client with partition id i lives in ``envs[i]`` (tests, benchmarks)."""
    return make_client_app(lambda context: envs[partition_id(context)])


def make_client_app(env_fn: Callable[[Context], object] = env_from_run_config) -> ClientApp:
    """A ClientApp whose clients live in ``env_fn(context)``."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return serve(msg, context, "fedavg", env_fn)

    @app.query("vanilla")
    def vanilla(msg: Message, context: Context) -> Message:
        return serve(msg, context, "vanilla", env_fn)

    @app.query("nograd")
    def nograd(msg: Message, context: Context) -> Message:
        return serve(msg, context, "nograd", env_fn)

    @app.query(HELLO)
    def hello(msg: Message, context: Context) -> Message:
        return Message(RecordDict({"config": ConfigRecord({"partition-id": partition_id(context)})}), reply_to=msg)

    return app


app = make_client_app()

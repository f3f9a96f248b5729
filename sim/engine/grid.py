"""An in-process Flower ``Grid``: the real ServerApp logic and the real ClientApp, no engine.

:class:`InProcessGrid` implements Flower's ``Grid`` interface by calling a ``ClientApp``
directly, one node per client, each with its own ``Context`` (``node_config`` holds
``partition-id`` and ``num-partitions``, as Flower's simulation and SuperNodes give it;
``state`` persists between messages, as a SuperNode keeps it). Messages are the same
``Message`` objects with the same records as under Flower's engines, so payloads are
serialised to bytes and back: nothing is shared between the two sides.

This is the default transport (deterministic, ~ms per round trip, used by tests and by
``splitcontrol compare``); Flower's Ray simulation and Deployment Engine run the same
apps (see ``sim/server_app.py`` and ``sim/client_app.py``).
"""
from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Iterable

from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from sim.core.config import ExperimentConfig, to_run_config
from sim.engine.client_app import HELLO, make_client_app

SERVER_NODE_ID = 1  # Flower's SUPERLINK_NODE_ID
FIRST_CLIENT_NODE_ID = 100


def quiet_flower_logs() -> None:
    """Flower's logger at ``$FLWR_LOG_LEVEL`` (default WARNING): its FedAvg logs every round at INFO."""
    logging.getLogger("flwr").setLevel(os.environ.get("FLWR_LOG_LEVEL", "WARNING"))


class InProcessGrid(Grid):
    """``num_nodes`` clients served by ``client_app`` in this process (node ids 100, 101, ...).

    ``node_config`` (e.g. the client-side ``data-seed`` and ``client-seed``) joins every
    node's ``partition-id`` and ``num-partitions``, as a SuperNode's ``--node-config`` does;
    the ``run_config`` is what the ServerApp sees too, so it holds public keys only."""

    def __init__(self, client_app: ClientApp, num_nodes: int, run_config: dict, run_id: int = 1,
                 node_config: dict | None = None):
        if num_nodes < 1:
            raise ValueError(f"num_nodes must be >= 1, got {num_nodes}")
        self.client_app = client_app
        self._run = Run.create_empty(run_id)
        self._pending: dict[str, Message] = {}
        self.contexts = {
            FIRST_CLIENT_NODE_ID + i: Context(run_id=run_id, node_id=FIRST_CLIENT_NODE_ID + i,
                                              node_config={**(node_config or {}), "partition-id": i,
                                                           "num-partitions": num_nodes},
                                              state=RecordDict(), run_config=dict(run_config))
            for i in range(num_nodes)
        }
        # an exception in the ClientApp: raised here (default), or returned as an error reply, as
        # Flower's engines do (set by a strategy that tolerates failed clients)
        self.errors_as_replies = False
        # what a running ServerApp has set: lets Flower's strategies build Messages
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, SERVER_NODE_ID

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for m in messages:
            if m.metadata.dst_node_id not in self.contexts:
                raise ValueError(f"no node {m.metadata.dst_node_id}; nodes are {list(self.contexts)}")
            m.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            ids.append(m.metadata.message_id)
            self._pending[m.metadata.message_id] = m
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = []
        for mid in message_ids:
            m = self._pending.pop(mid)
            try:
                replies.append(self.client_app(m, self.contexts[m.metadata.dst_node_id]))
            except Exception as e:  # noqa: BLE001 -- the client's failure, whatever it is
                if not self.errors_as_replies:
                    raise
                replies.append(error_reply(m, e))
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Each message served in turn; with ``timeout`` (seconds per message), a client that has not
        replied by then yields no reply, as under Flower's engines (its call goes on in a daemon
        thread: Python cannot stop it). An exception in the ClientApp propagates, as in-process."""
        ids = list(self.push_messages(messages))
        if timeout is None:
            return list(self.pull_messages(ids))
        replies = []
        for mid in ids:
            m = self._pending.pop(mid)
            box: dict = {}

            def serve(m=m, box=box):
                try:
                    box["reply"] = self.client_app(m, self.contexts[m.metadata.dst_node_id])
                except BaseException as e:  # handed to the caller's thread below
                    box["error"] = e

            worker = threading.Thread(target=serve, daemon=True, name=f"client-node-{m.metadata.dst_node_id}")
            worker.start()
            worker.join(timeout)
            if "error" in box:
                if not self.errors_as_replies or not isinstance(box["error"], Exception):
                    raise box["error"]
                box["reply"] = error_reply(m, box["error"])
            if "reply" in box:
                replies.append(box["reply"])
        return replies


def error_reply(msg: Message, e: Exception) -> Message:
    """The reply Flower's engines give for a ClientApp that raised."""
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(e).__name__}: {e}"),
                   reply_to=msg)


def in_process_grid(cfg: ExperimentConfig) -> InProcessGrid:
    """``num-clients`` clients of the Flower ClientApp in this process: the public run config for all,
    each node's client-side keys in its node config (as a SuperNode's ``--node-config``)."""
    return InProcessGrid(make_client_app(), cfg.num_clients, to_run_config(cfg), node_config=cfg.client_side())


def discover(grid, num_clients: int) -> list[int]:
    """Node ids ordered by partition id: asks every node (node ids are random per Flower run)."""
    deadline = time.monotonic() + 120  # SuperNodes that just started may not be registered yet
    while len(nodes := list(grid.get_node_ids())) < num_clients and time.monotonic() < deadline:
        time.sleep(1.0)
    replies = grid.send_and_receive([Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=n,
                                             message_type=f"query.{HELLO}") for n in nodes])
    by_pid = {}
    for r in replies:
        if r.has_error():
            raise RuntimeError(f"node {r.metadata.src_node_id} failed to say hello: {r.error.reason}")
        by_pid[int(r.content.config_records["config"]["partition-id"])] = r.metadata.src_node_id
    if sorted(by_pid) != list(range(num_clients)):
        raise RuntimeError(f"expected clients with partition ids 0..{num_clients - 1}, found {sorted(by_pid)} "
                           f"on {len(nodes)} nodes")
    return [by_pid[i] for i in range(num_clients)]

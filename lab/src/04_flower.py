# %% [markdown]
# # Lab 4: Flower: the same app under Flower's simulation engine
#
# **Learning goals.** After this lab you can
# 1. name the Flower pieces this project is made of (a `ServerApp`, a `ClientApp`, `Message`s of a
#    message type carrying a `RecordDict` of `ArrayRecord` / `ConfigRecord` / `MetricRecord`) and say
#    what one FedAvg and one nograd round trip carry;
# 2. describe a non-IID (Dirichlet) partition of 10 clients, and what each scheme does with clients
#    of unequal size;
# 3. read a run's transcript (one line per round trip) to compute what a scheme costs per training
#    step and per client, and check it against the run's summary;
# 4. run the same apps under Flower's Ray simulation engine and on the in-process grid, and say which
#    numbers must agree between the two and which need not.
#
# **Time:** about 3 minutes on a 2-core laptop CPU (the Ray run takes about 1.5 of them, the in-process
# run about 1).
#
# **The setting.** As in Lab 1 (ControlNet on Fill50K circles, a frozen tiny diffusion model on the
# server), but with **10 clients** whose data is **non-IID**: each circle colour is shared between the
# clients in Dirichlet(0.3) proportions, so each client's data is dominated by a few colours. Two schemes:
# FedAvg and no-gradient-return split learning (nograd).

# %%
import json
import os

import matplotlib.pyplot as plt
import numpy as np
from flwr.app import Message

from labcheck import check, check_close, out_dir, run, table
from sim.core.data import COLOURS, load_dataset, partition
from sim.core.wire import encode, record_nbytes
from sim.engine.clientside import resolved
from sim.engine.context import context_for, load_experiment
from sim.engine.grid import in_process_grid
from strategies import SCHEMES
from strategies.base import turn_schedule
from strategies.fedavg import FitIns
from strategies.nograd import FeaturesRequest

# The run of this lab: the `lab` preset with 10 clients, a Dirichlet partition, two schemes, 100 steps.
OVERRIDES = ["num-clients=10", "partition=dirichlet", "dirichlet-alpha=0.3", 'schemes=["fedavg", "nograd"]',
             "steps=100", "baseline=false", "eval-samples=16"]
cfg = load_experiment("lab", OVERRIDES)
print(f"num-clients={cfg.num_clients} partition={cfg.partition} dirichlet-alpha={cfg.dirichlet_alpha} "
      f"steps={cfg.steps} batch-size={cfg.batch_size} local-steps={cfg.local_steps} num-samples={cfg.num_samples}")

# %% [markdown]
# ## 1. The Flower pieces
# The project is one Flower app (see `[tool.flwr.app.components]` in `pyproject.toml`):
#
# * the **ServerApp** (`sim/engine/server_app.py`): `app = ServerApp()` whose `main(grid, context)`
#   asks every node for its partition id (a `query.hello` message: Flower's node ids are random),
#   then runs each scheme's server side over the `grid` Flower hands it (`run_compare(..., grid=grid)`),
#   and writes the run folder;
# * the **ClientApp** (`sim/engine/client_app.py`): one handler per scheme, registered by message type;
#   for every message it builds the scheme's client from its own data partition (`partition-id` in
#   its node config), restores its state from `context.state`, answers, and saves the state back;
# * a **Message**: a message type, a destination node and a `RecordDict` holding `ArrayRecord`s
#   (tensors), `ConfigRecord`s (settings) and `MetricRecord`s (numbers).
#
# Who handles which message type:

# %%
for name, cls in SCHEMES.items():
    kind = "@app.train()" if cls.message_type == "train" else f"@app.query({cls.message_type.split('.')[1]!r})"
    print(f"{name:9} message type {cls.message_type!r:17} ClientApp handler {kind}")

# %% [markdown]
# A Grid is how the ServerApp talks to the nodes: `send_and_receive(messages)` returns the replies.
# Under Flower's Ray simulation the grid is Flower's; by default (`splitcontrol compare`) it is the
# project's in-process grid (`sim/engine/grid.py`), which calls the *same* ClientApp object directly,
# one Flower `Context` per node. Let us send one nograd request by hand to the node of client 3 and
# look at the reply. (Node ids are 100, 101, ... in-process; under Ray they are random.)

# %%
grid = in_process_grid(resolved(cfg))  # 10 nodes; resolved(): the clients' own seed, drawn here
nodes = list(grid.get_node_ids())
request = encode(FeaturesRequest(k=cfg.local_steps))  # the typed message, as Flower records
print("nodes:", nodes)
print("request:", request)
[reply] = grid.send_and_receive([Message(request, dst_node_id=nodes[3], message_type="query.nograd")])
print("reply from node", reply.metadata.src_node_id, "to", reply.metadata.message_type)
for key, rec in reply.content.array_records.items():
    for n, a in rec.items():
        print(f"  ArrayRecord {key!r:10} {n:14} shape {tuple(a.shape)} {a.dtype}")
for key, rec in reply.content.metric_records.items():
    print(f"  MetricRecord {key!r}: {sorted(rec)}")
print("bytes down:", record_nbytes(request), " bytes up:", record_nbytes(reply.content))

# %% [markdown]
# The nograd request is one integer, `k` (the batches to send); the reply holds `k` batches of what the
# server needs to train the ControlNet (the client's `E(hint) + x_t`, the frozen UNet's first-layer
# output, the timesteps, the noise target and the prompt embedding), plus the client's own timing
# metrics. FedAvg's request is Flower's own FedAvg layout: the whole global ControlNet and a config:

# %%
ctx = context_for(cfg)  # the public model, recipe and initial ControlNet (loaded once per process)
fit = encode(FitIns(dict(ctx.controlnet.state_dict()), server_round=1, local_steps=cfg.local_steps))
print({key: type(rec).__name__ for key, rec in fit.items()}, "config:", dict(fit.config_records["config"]))
print(f"{len(fit.array_records['arrays'])} tensors, {record_nbytes(fit):,} bytes down per client per round")

# %% [markdown]
# ## 2. A non-IID partition of 10 clients
# The clients' data is private: here (the teacher's view of a simulation) we read it, but the server
# never does. The runner draws the clients' pool of `num-samples` circles from the client-side
# `data-seed` and splits it with `sim.core.data.partition` over the circle colour (`fg`), as
# `sim/core/splits.py` shows. `RunContext.client_data` returns one `ClientData` per client
# (`target`, `condition`, `prompts`); every Ray node builds its own the same way (the default
# `data-seed`, the same on every node).

# %%
clients = ctx.client_data(cfg)
print("samples per client:", [len(c) for c in clients])
print("client 1's first prompts:", clients[1].prompts[:3])

# %% [markdown]
# ### Exercise 4.1: who holds which colours?
# Build `counts`, a `(10, 8)` integer array: `counts[c, j]` = how many of client `c`'s samples have a
# circle of colour `palette[j]`. A prompt reads `"a {circle colour} circle on a {background colour}
# background"`. Then `distinct[c]` = the number of circle colours client `c` holds at all.

# %%
palette = list(COLOURS)
print("palette:", palette)
# BEGIN SOLUTION
counts = np.zeros((len(clients), len(palette)), dtype=int)
for c, data in enumerate(clients):
    for prompt in data.prompts:
        counts[c, palette.index(prompt.split()[1])] += 1
distinct = (counts > 0).sum(axis=1)
# END SOLUTION
print("circle colours per client:", [int(v) for v in distinct])

# %% [markdown]
# Self-check: the same counts from the partition itself (the pool's `fg` labels, split by
# `partition(labels, num_clients, "dirichlet", alpha, seed=data-seed)`, as the runner does).

# %%
pool = load_dataset("fill50k", n=cfg.num_samples, size=ctx.base.preset.image_size, seed=cfg.data_seed,
                    max_radius=cfg.max_radius)
labels = np.array(pool["fg"])
parts = partition(labels, cfg.num_clients, "dirichlet", cfg.dirichlet_alpha, seed=cfg.data_seed)
want = np.array([[np.sum(labels[idx] == colour) for colour in palette] for idx in parts])
check_close("Exercise 4.1 (counts)", counts, want, 0, "counts[c, j]: client c's prompts whose circle is palette[j].")
check("Exercise 4.1 (distinct)", list(distinct) == list((want > 0).sum(axis=1)),
      "distinct[c] counts the colours with counts[c, j] > 0.")

# %%
fig, ax = plt.subplots(figsize=(8, 3.6))
ax.imshow(counts.T, cmap="Blues", aspect="auto")
for c in range(counts.shape[0]):
    for j in range(counts.shape[1]):
        ax.text(c, j, counts[c, j], ha="center", va="center", fontsize=7,
                color="white" if counts[c, j] > counts.max() / 2 else "black")
ax.set_xticks(range(len(clients)), [f"{c}\n({len(clients[c])})" for c in range(len(clients))])
ax.set_yticks(range(len(palette)), palette)
ax.set_xlabel("client (samples)")
ax.set_title(f"Circle colours per client: Dirichlet(alpha={cfg.dirichlet_alpha})")
plt.tight_layout()

# %% [markdown]
# ## 3. Both schemes under Flower's Ray simulation engine
# `run_ray(cfg, out)` (`sim/engine/ray_sim.py`, the same as `splitcontrol flower-sim --preset lab --set
# num-clients=10 ...`) calls Flower's `flwr.simulation.run_simulation` with a ServerApp whose `main` is
# the one above (the configuration and the folder given in code: `run_simulation` takes no run config),
# the ClientApp, `num_supernodes=10` virtual SuperNodes and one CPU per client: Ray runs the ClientApp in a
# pool of actors, so at most as many clients compute at once as there are cores. Each virtual node
# draws its own client seed on its first message and keeps it in its state: no `clients.toml` is
# written. Flower 1.42 logs that `run_simulation` is deprecated: its command-line successor is
# `flwr run .`, which reads the same app from `pyproject.toml` (see the README's "Flower's engines").
# About 1.5 minutes, Ray's start-up included; a finished run of the same configuration is reused
# (`labcheck.run(..., engine="ray")` calls `run_ray`).

# %%
print("cores here:", os.cpu_count())


ray_summary = run("lab4_ray", "lab", OVERRIDES, engine="ray")  # labcheck.run -> run_ray
ray_rows = {r["scheme"]: r for r in ray_summary["rows"]}
print("engine:", ray_summary["engine"], " wall seconds:", ray_summary["engine_wall_s"])
table(ray_summary["rows"], ["scheme", "outline_iou", "outline_iou_se", "final_loss", "client_trainable_params",
                            "bytes_up_per_step", "bytes_down_per_step", "messages_per_step", "wall_s", "client_s"])

# %% [markdown]
# ## 4. Reading the transcript
# Every message of a scheme passed through one recording grid (`sim/engine/transcript.py`), which wrote a
# line to `transcript.jsonl` per round trip: the scheme, the client (partition id), the round (a FedAvg
# round, or one client's turn in split learning), the training steps the message serves
# (`first_step`, `num_steps`; a FedAvg message serves its whole round), the serialised bytes each way,
# and the client's compute seconds and peak memory. (The `query.hello` messages come before it and are
# not in it.)

# %%
transcript = [json.loads(line) for line in (out_dir("lab4_ray") / "transcript.jsonl").read_text().splitlines()]
print(len(transcript), "round trips; keys:", list(transcript[0]))
table([t for t in transcript if t["scheme"] == "fedavg"][:3] + [t for t in transcript if t["scheme"] == "nograd"][:3],
      ["scheme", "round", "client", "message_type", "first_step", "num_steps", "bytes_down", "bytes_up", "client_s"])

# %%
fig, axes = plt.subplots(1, 2, figsize=(10, 3.2), sharey=True)
for ax, scheme in zip(axes, ["fedavg", "nograd"]):
    rows = [t for t in transcript if t["scheme"] == scheme]
    ax.scatter([t["first_step"] for t in rows], [t["client"] for t in rows],
               s=[20 + 40 * t["bytes_up"] / 1e6 for t in rows], alpha=0.6)
    ax.set_title(f"{scheme}: who sent when (dot area ~ bytes up)")
    ax.set_xlabel("first training step the message serves")
    ax.set_xlim(-5, cfg.steps)
axes[0].set_ylabel("client")
axes[0].set_yticks(range(cfg.num_clients))
plt.tight_layout()

# %% [markdown]
# FedAvg sends to all 10 clients at the start of each round (they train independently, in parallel
# where the engine allows); nograd takes the clients in turn, one turn of `local-steps` batches each.
#
# ### Exercise 4.2: cost per training step, from the transcript
# For each scheme, compute from `transcript` alone the bytes up (client to server) per training step,
# the bytes down per training step and the messages per training step, into dicts keyed by scheme.
# A run trains `cfg.steps` steps per scheme (do not sum `num_steps`: a FedAvg message's window is its
# whole round, shared by the round's 10 messages).

# %%
schemes = list(ray_rows)
# BEGIN SOLUTION
up_per_step = {s: sum(t["bytes_up"] for t in transcript if t["scheme"] == s) / cfg.steps for s in schemes}
down_per_step = {s: sum(t["bytes_down"] for t in transcript if t["scheme"] == s) / cfg.steps for s in schemes}
messages_per_step = {s: sum(t["scheme"] == s for t in transcript) / cfg.steps for s in schemes}
# END SOLUTION
for s in schemes:
    print(f"{s:7} up {up_per_step[s]:12,.1f} B/step  down {down_per_step[s]:12,.1f} B/step  "
          f"messages {messages_per_step[s]:.2f}/step")

# %%
for s in schemes:
    check_close(f"Exercise 4.2 ({s})", [up_per_step[s], down_per_step[s], messages_per_step[s]],
                [ray_rows[s]["bytes_up_per_step"], ray_rows[s]["bytes_down_per_step"],
                 ray_rows[s]["messages_per_step"]], 1e-6,
                "Sum bytes_up (bytes_down, messages) over the scheme's lines, then divide by cfg.steps.")

# %% [markdown]
# Compare with Section 1: a nograd message down is the 8-byte `k`; a FedAvg message down is the whole
# ControlNet. FedAvg's cost per step is one model per client per round, spread over the round's steps;
# nograd's is one batch's activations.
#
# ### Exercise 4.3: what each client contributes
# With unequal clients, the schemes weigh them differently. From the transcript compute, per client `c`:
# * `batches[s][c]`: how many training batches client `c` trained (FedAvg) or sent (nograd) under
#   scheme `s`. A nograd message carries `num_steps` batches; a FedAvg client trains `cfg.local_steps`
#   batches per message it gets.
#
# Then, from the clients' data sizes (`len(clients[c])`):
# * `fedavg_weight[c]`: the weight of client `c`'s ControlNet in Flower's FedAvg average. Flower's
#   `FedAvg` weighs each reply by its `num-examples` metric (`weighted_by_key="num-examples"`), and the
#   FedAvg client reports the size of its data there (`FitRes(..., len(self.data), ...)` in
#   `strategies/fedavg.py`); the weights of a round sum to 1.

# %%
# BEGIN SOLUTION
batches = {s: np.zeros(cfg.num_clients, dtype=int) for s in schemes}
for t in transcript:
    batches[t["scheme"]][t["client"]] += cfg.local_steps if t["scheme"] == "fedavg" else t["num_steps"]
sizes = np.array([len(c) for c in clients])
fedavg_weight = sizes / sizes.sum()
# END SOLUTION
for s in schemes:
    print(f"batches per client, {s}:", [int(v) for v in batches[s]])
print("FedAvg weight per client:  ", np.round(fedavg_weight, 3).tolist())

# %% [markdown]
# Self-check: both schemes follow the public turn schedule (`strategies.base.turn_schedule`: blocks of
# `local-steps`, clients cycling), and the weights follow the partition's sizes.

# %%
schedule = np.zeros(cfg.num_clients, dtype=int)
for c, k in turn_schedule(cfg.steps, cfg.num_clients, cfg.local_steps):
    schedule[c] += k
for s in schemes:
    check_close(f"Exercise 4.3 (batches, {s})", batches[s], schedule, 0,
                "nograd: sum num_steps per client; fedavg: local_steps per message the client got.")
check_close("Exercise 4.3 (FedAvg weights)", fedavg_weight, [len(p) / cfg.num_samples for p in parts], 1e-9,
            "Each client's number of samples over all clients' samples.")

# %%
passes = batches["nograd"] * cfg.batch_size / sizes
fig, ax = plt.subplots(figsize=(7, 3))
x = np.arange(cfg.num_clients)
ax.bar(x - 0.2, batches["nograd"] / batches["nograd"].sum(), 0.4, label="share of training batches (both schemes)")
ax.bar(x + 0.2, fedavg_weight, 0.4, label="weight in FedAvg's average")
ax.set_xticks(x, [f"{c}\n({n})" for c, n in zip(x, sizes)])
ax.set_xlabel("client (samples)")
ax.set_ylabel("fraction")
ax.legend(fontsize=8)
plt.tight_layout()
print("times each client's average sample is drawn:", np.round(passes, 2).tolist())

# %% [markdown]
# Every client trains the same number of batches, whatever its size: a small client's samples are drawn
# many more times than a large client's. FedAvg then averages the ten ControlNets weighted by data size;
# nograd's server takes one gradient step per batch, so each client counts in proportion to its batches.
#
# ## 5. The same apps, in-process
# The same configuration on the in-process grid (what `splitcontrol compare` and Lab 1 use):
# deterministic, no Ray. About 1 minute.

# %%
local_summary = run("lab4_inprocess", "lab", OVERRIDES)
local_rows = {r["scheme"]: r for r in local_summary["rows"]}
keys = ["steps", "messages_per_step", "bytes_up_per_step", "bytes_down_per_step", "client_trainable_params",
        "final_loss", "outline_iou", "wall_s", "client_s", "client_setup_s"]
table([{"scheme": s, "column": k, "Ray": ray_rows[s][k], "in-process": local_rows[s][k],
        "equal": ray_rows[s][k] == local_rows[s][k]} for s in schemes for k in keys],
      ["scheme", "column", "Ray", "in-process", "equal"])

# %%
local_transcript = [json.loads(line)
                    for line in (out_dir("lab4_inprocess") / "transcript.jsonl").read_text().splitlines()]
protocol = ["scheme", "round", "client", "message_type", "first_step", "num_steps", "bytes_down", "bytes_up"]
same = [[t[k] for k in protocol] for t in transcript] == [[t[k] for k in protocol] for t in local_transcript]
print("every round trip has the same scheme, round, client, type, steps and bytes under both engines:", same)
rel = max(abs(ray_rows[s]["final_loss"] / local_rows[s]["final_loss"] - 1) for s in schemes)
print(f"largest relative difference of the final loss: {rel:.2g} (tests/test_ray_sim.py allows 1e-5)")

# %% [markdown]
# The protocol columns (steps, messages, bytes, trainable parameters) are properties of the scheme and
# the schedule, so they are equal by construction, and the training itself (the same batches, noise
# and seeds) gives the same loss. The timing columns are measurements of how the engine ran the
# clients (in parallel Ray actors, or one after another in the same process) and need not agree.
#
# ## What to take away
# * The project *is* a Flower app: one ServerApp drives every scheme through whatever `Grid` Flower
#   gives it, one ClientApp answers every scheme's message type; a round trip is a `Message` whose
#   `RecordDict` holds `ArrayRecord`s, `ConfigRecord`s and `MetricRecord`s.
# * Changing the engine (in-process grid, Ray simulation, Deployment Engine) changes who runs the
#   ClientApp and when, not what crosses the wire: the transcripts, the losses and the scores agree.
# * The transcript is the run's ledger: per message, who, when (which steps) and how many bytes. The
#   summary's per-step costs are sums over it.
# * Non-IID clients of unequal size: both schemes here give each client the same number of batches;
#   Flower's FedAvg weights the average by data size, split learning by batches.
#
# Going further: `splitcontrol flower-sim --preset lab --set num-clients=10 --set partition=dirichlet
# --out results/flower-sim` (this Ray run from the command line); `splitcontrol flwr-run . local-sim
# --run-config "steps=8"` (`flwr run` itself, stopping what it started); the `clients-scaling` sweep in
# the README (up to 100 clients under Ray).

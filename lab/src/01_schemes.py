# %% [markdown]
# # Lab 1: four ways to train a ControlNet on private data
#
# **Learning goals.** After this lab you can
# 1. say, for federated learning (FedAvg), vanilla split learning, no-gradient-return split
#    learning (nograd) and SplitFed, what the client *holds*, *trains* and *sends*, and what comes back;
# 2. predict a scheme's cost (trainable parameters on the client, bytes per training step)
#    from its cut, and check the prediction against a measured run;
# 3. decide whether a trained ControlNet really controls the image: outline IoU against the
#    base model without control, with a standard error and a paired test.
#
# **Time:** about 4 minutes on a 2-core laptop CPU (the training run takes about 2.5 of them).
#
# **The task.** Each user (client) owns private triples (condition image, target image, prompt):
# here procedural "Fill50K" circles, the classic ControlNet toy task. The condition is a circle's
# outline, the target the filled circle, the prompt names the two colours. A server owns a frozen
# text-to-image diffusion model (a 2.9 M-parameter UNet this project trained; the mechanics are
# those of Stable Diffusion). A *ControlNet* is a trainable copy of the UNet's encoder that reads
# the condition and nudges the frozen UNet, so the generated circle lands where the outline is.

# %%
import matplotlib.pyplot as plt
import numpy as np

from labcheck import check, check_close, out_dir, run, show, table
from sim.core.cuts import resolve
from sim.core.data import make_fill50k
from sim.core.models import build_controlnet, count_params, load_base
from strategies import SCHEMES

# %% [markdown]
# ## 1. The private data
# Four training triples. The model must learn: *outline in, filled circle of the prompt's colours out*.

# %%
data = make_fill50k(4, size=32, seed=0)
fig, axes = plt.subplots(2, 4, figsize=(8, 4.4))
for i in range(4):
    axes[0, i].imshow(data["condition"][i])
    axes[1, i].imshow(data["target"][i])
    axes[0, i].set_title(data["prompt"][i].replace(" on a", "\non a"), fontsize=8)
for ax in axes.flat:
    ax.axis("off")
axes[0, 0].text(-4, 16, "condition", rotation=90, va="center", ha="right")
axes[1, 0].text(-4, 16, "target", rotation=90, va="center", ha="right")
plt.tight_layout()

# %% [markdown]
# ## 2. The schemes, as the code declares them
# Every scheme is one file in `strategies/`. Its `cut` says which model parts sit on the client,
# which of those the client trains, and which tensors cross the wire each step (`up`: client to
# server; `down`: server to client). `client_part` summarises what the client holds of the ControlNet:
# `whole` (FedAvg), `head` (a trainable first layer), `frozen` (nothing trainable).

# %%
for name, cls in SCHEMES.items():
    cut = cls.cut
    print(f"{name:9} client_part={cls.client_part:7} clients run in {cls.concurrency}")
    print(f"{'':9} client holds:  {', '.join(cut.client)}")
    print(f"{'':9} client trains: {', '.join(cut.client_trainable) or 'nothing'}")
    print(f"{'':9} up each step:  {', '.join(cut.up) or '(weights, once per round)'}")
    print(f"{'':9} down each step: {', '.join(cut.down) or 'nothing'}\n")

# %% [markdown]
# ### Exercise 1.1: how many parameters does the vanilla client train?
# The vanilla client trains the modules its cut lists in `client_trainable` (the ControlNet's
# hint encoder and first convolution). Build the tiny ControlNet and count the parameters of exactly
# those modules. Use `resolve(name, controlnet=cn)`, which turns a cut entry such as
# `"controlnet.conv_in"` into the module, and `count_params(module)`.

# %%
base = load_base("tiny")
cn = build_controlnet(base.unet, base.preset)
vanilla_cut = SCHEMES["vanilla"].cut
# BEGIN SOLUTION
vanilla_client_params = sum(count_params(resolve(name, controlnet=cn)) for name in vanilla_cut.client_trainable)
# END SOLUTION
print("the whole ControlNet:", count_params(cn), "parameters; the vanilla client trains", vanilla_client_params)

# %% [markdown]
# Self-check: the ControlNet the runner trains has the same parts, so your count must equal the
# parameters the runner's vanilla client reports it trained (checked after the run below, too).

# %%
prefixes = tuple(name.split(".", 1)[1] + "." for name in vanilla_cut.client_trainable)
head = sum(p.numel() for n, p in cn.named_parameters() if n.startswith(prefixes))
check("Exercise 1.1", vanilla_client_params == head,
      "Sum count_params over the modules in vanilla_cut.client_trainable, nothing else.")

# %% [markdown]
# ## 3. Train all four schemes on the same data
# `splitcontrol compare --preset lab` (here through `labcheck.run`, which calls the same
# `run_compare`): 2 clients, the same 300 batches of 4 samples for every scheme, the same
# initial ControlNet and seeds, every message through Flower's message API on an in-process grid.
# Then 32 held-out outlines are sampled with every ControlNet and with the base model alone (no
# control), from the same initial noise. About 2.5 minutes on 2 cores.

# %%
summary = run("lab1")
rows = {r["scheme"]: r for r in summary["rows"]}
table(summary["rows"], ["scheme", "outline_iou", "outline_iou_se", "colour_acc", "client_trainable_params",
                        "bytes_up_per_step", "bytes_down_per_step", "messages_per_step", "client_s", "server_s"])

# %% [markdown]
# Reading the table: `outline_iou` is the overlap of the generated circle's outline with the
# condition's (1 = perfect, the base model without control scores what a random circle scores);
# `colour_acc` whether both colours match the prompt; bytes and messages are per training step
# (one batch); `client_s` the clients' compute time, `server_s` the server's.

# %%
check("Exercise 1.1 (against the run)", vanilla_client_params == rows["vanilla"]["client_trainable_params"],
      "The run's vanilla client trained a different number of parameters than you counted.")

# %% [markdown]
# ### Exercise 1.2: predict FedAvg's upload per training step
# A FedAvg client trains its own copy of the whole ControlNet for `local-steps` batches, then sends
# all its weights (float32: 4 bytes each) to the server, which averages them and sends the average
# back. A round covers `num-clients x local-steps` training steps. Predict the bytes one training
# step costs on the uplink, on average, from `count_params(cn)` and the run's configuration
# (`cfg` below), ignoring the few bytes of message headers.

# %%
from sim.engine.clientside import load_run_config  # noqa: E402  (the run's configuration)

cfg = load_run_config(out_dir("lab1"))
print("local-steps:", cfg.local_steps, " num-clients:", cfg.num_clients, " batch-size:", cfg.batch_size)
# BEGIN SOLUTION
rounds_bytes = cfg.num_clients * count_params(cn) * 4  # every client uploads its weights once per round
fedavg_up_per_step = rounds_bytes / (cfg.num_clients * cfg.local_steps)
# END SOLUTION
print(f"predicted {fedavg_up_per_step:,.0f} B per step; measured {rows['fedavg']['bytes_up_per_step']:,.0f} B")

# %%
check_close("Exercise 1.2", fedavg_up_per_step / rows["fedavg"]["bytes_up_per_step"], 1.0, 0.01,
            "Per round every client sends count_params(cn) * 4 bytes; a round is num_clients * local_steps steps.")

# %% [markdown]
# Compare with the split schemes: they send activations of every sample, every step, so their
# upload grows with the batch, FedAvg's with the model. At Stable Diffusion scale
# (`splitcontrol cost --preset sd15`) FedAvg moves 1.4 GB per round each way, nograd 5.4 MB per sample.

# %%
fig, ax = plt.subplots(figsize=(6.5, 3))
names = list(SCHEMES)
up = [rows[n]["bytes_up_per_step"] / 1e6 for n in names]
down = [rows[n]["bytes_down_per_step"] / 1e6 for n in names]
x = np.arange(len(names))
ax.bar(x - 0.2, up, 0.4, label="client -> server")
ax.bar(x + 0.2, down, 0.4, label="server -> client")
ax.set_xticks(x, names)
ax.set_ylabel("MB per training step")
ax.set_title("What crosses the wire per step (lower is cheaper)")
ax.legend()
plt.tight_layout()

# %% [markdown]
# ## 4. Does each ControlNet control?
# The samples: one column per held-out condition; rows: the condition, the base model without
# control, each scheme's ControlNet, the private target.

# %%
show(out_dir("lab1") / "samples.png")

# %% [markdown]
# ### Exercise 1.3: the gain over no control, and is it real?
# For every scheme, compute `gain[scheme]` = its outline IoU minus the base model's (the row
# `"base (no control)"`). Then read `summary["comparisons"]`: the paired t-tests over the same 32
# conditions and initial noise, one dict per pair with keys `a`, `b`, `metric`, `p`. Put in
# `resolved[scheme]` whether the test of (base, scheme) on `outline_iou` has p < 0.05.

# %%
# BEGIN SOLUTION
base_iou = rows["base (no control)"]["outline_iou"]
gain = {s: rows[s]["outline_iou"] - base_iou for s in SCHEMES}
resolved = {c["b"]: c["p"] < 0.05 for c in summary["comparisons"]
            if c["a"] == "base" and c["metric"] == "outline_iou"}
# END SOLUTION
for s in SCHEMES:
    print(f"{s:9} gain {gain[s]:+.3f} (SE of its IoU {rows[s]['outline_iou_se']:.3f}), resolved: {resolved[s]}")

# %%
check_close("Exercise 1.3 (gain)", [gain[s] for s in SCHEMES],
            [rows[s]["outline_iou"] - rows["base (no control)"]["outline_iou"] for s in SCHEMES], 1e-9,
            "gain = scheme's outline_iou - the base row's outline_iou.")
check("Exercise 1.3 (resolved)", all(resolved[s] for s in SCHEMES) and all(gain[s] >= 0.2 for s in SCHEMES),
      "Every scheme's gain should be resolved (p < 0.05) and at least 0.2 at this budget.")

# %% [markdown]
# ## What to take away
# * All four ControlNets control the layout at this tiny budget; their utility is close (the
#   differences between schemes are within a few standard errors at 32 conditions).
# * They differ in **cost** and in **who trains what**: the FedAvg client trains 1.45 M parameters
#   and ships them every round; the vanilla/SplitFed client trains a ~6 K-parameter head and needs
#   the server's gradient every step; the nograd client trains nothing and receives nothing.
# * What they differ in **privacy** is the next lab: everything the split clients send every step
#   sits on the server.
#
# Going further: `splitcontrol compare --out results/demo` (the default run: 1,000 batches of 8,
# 128 conditions, about 10 minutes), `splitcontrol cost --preset sd15` (the same at Stable Diffusion scale).

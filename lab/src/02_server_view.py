# %% [markdown]
# # Lab 2: what the server sees
#
# **Learning goals.** After this lab you can
# 1. list what an honest-but-curious server holds after split learning: every message the clients
#    sent, the public recipe and the public models, and nothing of the clients' memory;
# 2. write the *noise-target attack* yourself (about ten lines) and explain why it recovers every
#    private image exactly from the paper's wire format;
# 3. recover the private condition (the hint) and the prompt from the same messages, and judge an
#    attack against the *blind guess* (what the server guesses without any message).
#
# **Time:** about 2 minutes on a 2-core laptop CPU.
#
# **Setting.** No-gradient-return split learning (`nograd`, the paper's scheme): each training step
# the client draws a batch of its private (condition, target, prompt) triples, a timestep t and
# noise eps, makes the noisy latent x_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps, runs the *public,
# frozen* first layers and sends their outputs, with t, eps (the training target) and the prompt's
# text embedding. The server trains the ControlNet on them. Nothing comes back.

# %%
import matplotlib.pyplot as plt
import torch

from attacks import make_attack
from attacks.common import invert_conv
from attacks.scoring import image_scores
from labcheck import check, check_close, out_dir, run
from sim.core.data import COLOURS
from sim.engine.clientside import load_run_config
from sim.engine.scoring import attack_view, blind_scores, server_view
from sim.engine.truth import private_samples

# %% [markdown]
# ## 1. A short training run that keeps the server's messages
# The attack does not need a trained ControlNet, only what crossed the wire, so 20 training steps
# are enough. `keep-messages=4` makes the server keep the first 4 messages it received.

# %%
run("lab2", "lab", ['schemes=["nograd"]', "steps=20", "keep-messages=4", "baseline=false",
                    "eval-samples=4", "ddim-steps=3"])
RUN = out_dir("lab2")

# %% [markdown]
# ## 2. The server's view
# `server_view` builds, from the run folder's public part only, what the server holds: the public
# config (no client keys: the clients' seeds sit in `clients.toml`, which the view never reads), the
# kept messages, the public frozen models and noise schedule. Attacks get this object and nothing else.

# %%
view = server_view(RUN, "nograd")
print("public config holds a client seed:", hasattr(view.cfg, "client_seed"))
first = view.messages[0]["up"]["tensors"]
for name, tensor in first.items():
    print(f"{name:14} {tuple(tensor.shape)} {tensor.dtype}")
batches = view.batches()
print(len(batches), "batches of", batches[0]["t"].shape[0], "samples kept")

# %% [markdown]
# One message carries several batches (one per step of the client's turn). Per sample:
# `unet_features` = the UNet's first convolution of x_t; `control_input` = E(hint) + x_t (the
# ControlNet's input, hint encoded by the public autoencoder); `t`; `noise` = eps; `context` = the
# prompt's text-encoder states.
#
# ## 3. Exercise 2.1: the noise-target attack
# The first convolution maps 3 channels to 32: it is injective, so the server can solve it for x_t
# exactly (`invert_conv`, conjugate gradients on public weights, done for you below). Then the
# server holds x_t, t and eps for every sample. **Write `recover_image(x_t, t, eps)`**: invert
# x_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps for z0 and decode it with the public autoencoder
# (`view.base.autoencoder.decode`), clamped to [-1, 1]. `abar = view.scheduler.alphas_cumprod`
# (index it with t; reshape to broadcast over (batch, channels, height, width)).

# %%
b = batches[0]
x_t = invert_conv(view.base.unet.conv_in, b["unet_features"])
abar = view.scheduler.alphas_cumprod


def recover_image(x_t, t, eps):
    # BEGIN SOLUTION
    a = abar[t].view(-1, 1, 1, 1)
    z0 = (x_t - (1 - a).sqrt() * eps) / a.sqrt()
    return view.base.autoencoder.decode(z0).clamp(-1, 1)
    # END SOLUTION


with torch.no_grad():
    mine = recover_image(x_t, b["t"], b["noise"].float())
print("recovered", tuple(mine.shape), "images of the first kept batch")

# %% [markdown]
# Self-check: the project's own `noise-target` attack (attacks/noise_target.py) must give the same
# images for this batch, and both must match the client's private targets (SSIM 1 = identical).
# Scoring needs the private data: only the teacher's harness holds it (`load_run_config` reads the
# clients' keys to replay their batches), never the attack.

# %%
with torch.no_grad():
    project = make_attack("noise-target").run(view)
n = mine.shape[0]
check_close("Exercise 2.1 (same as the project's attack)", mine, project.images[:n], 1e-3,
            "z0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), then decode.")
cfg = load_run_config(RUN)  # the teacher's view: with the clients' keys, for scoring only
truth = private_samples(cfg, "nograd", view.messages, project.refs[:n], view.history)
ssim = image_scores(mine, truth["target"], signed=True)["ssim"]
blind = blind_scores(cfg)
print(f"your attack: SSIM {ssim:.3f} against the private targets; a blind guess scores "
      f"{blind['image']['ssim']:.3f}")
check("Exercise 2.1 (recovers the private images)", ssim > 0.99, "Your images should equal the private targets.")

# %%
fig, axes = plt.subplots(2, n, figsize=(1.4 * n, 3), squeeze=False)
for i in range(n):
    axes[0, i].imshow(((truth["target"][i].permute(1, 2, 0) + 1) / 2).clamp(0, 1))
    axes[1, i].imshow(((mine[i].permute(1, 2, 0) + 1) / 2).clamp(0, 1))
for ax in axes.flat:
    ax.axis("off")
axes[0, 0].set_title("private target", loc="left", fontsize=9)
axes[1, 0].set_title("the server's reconstruction", loc="left", fontsize=9)
plt.tight_layout()

# %% [markdown]
# Why it works whatever the timestep: the attack never denoises anything; eps is *given*. The
# paper's defenses (a timestep policy, an activation on the control branch, an fp16 wire) leave
# this algebra intact (Lab 3 measures it).
#
# ## 4. Exercise 2.2: the private condition
# Under nograd the control branch is `control_input` = E(2 hint - 1) + x_t, where E is the public
# encoder. **Write `recover_hint(control, x_t)`**: subtract x_t, decode with the public autoencoder,
# and map the decoded image from [-1, 1] to a hint in [0, 1] (clamped).

# %%
def recover_hint(control, x_t):
    # BEGIN SOLUTION
    signed = view.base.autoencoder.decode(control - x_t)
    return ((signed + 1) / 2).clamp(0, 1)
    # END SOLUTION


with torch.no_grad():
    hints = recover_hint(b["control"], x_t)
hint_ssim = image_scores(hints, truth["hint"], signed=False)["ssim"]
print(f"hint SSIM {hint_ssim:.3f}; blind guess {blind['hint']['ssim']:.3f}")

# %%
check_close("Exercise 2.2 (same as the project's attack)", hints, project.hints[:n], 1e-3,
            "E(hint) = control - x_t; decode; (x + 1) / 2, clamped to [0, 1].")
check("Exercise 2.2 (recovers the private hints)", hint_ssim > 0.99, "Your hints should equal the private ones.")

# %% [markdown]
# ## 5. Exercise 2.3: the prompt
# The `context` of each sample is the public text encoder's output for its prompt (or for the empty
# prompt: 50% of training prompts are dropped, the usual classifier-free-guidance recipe). The prompts
# of this task are "a {fg} circle on a {bg} background" over the colours in `COLOURS`.
# **Fill `guesses`**: for every sample of the batch, the candidate prompt whose embedding
# (`view.base.encode_prompts(candidates)`) is nearest (L2 over all tokens) to its context; leave
# samples whose context is the empty prompt's embedding as `""`.

# %%
candidates = [f"a {fg} circle on a {bg} background" for fg in COLOURS for bg in COLOURS if fg != bg]
with torch.no_grad():
    emb = view.base.encode_prompts(candidates).flatten(1)
    empty = view.base.encode_prompts([""]).flatten(1)[0]
context = b["context"].float().flatten(1)
# BEGIN SOLUTION
guesses = []
for c in context:
    if torch.allclose(c, empty, atol=1e-5):
        guesses.append("")
    else:
        guesses.append(candidates[int(torch.cdist(c[None], emb).argmin())])
# END SOLUTION
for g, p in list(zip(guesses, truth["prompt_used"]))[:4]:
    print(f"guess {g!r:45} trained with {p!r}")

# %%
right = sum(g == p for g, p in zip(guesses, truth["prompt_used"]))
check("Exercise 2.3", right == len(guesses) and len(guesses) == n,
      f"{right} of {n} right: compare each context with every candidate's embedding; the empty prompt is ''.")

# %% [markdown]
# ## 6. The whole catalogue, scored
# The project's harness runs attacks on every kept message and scores them against the private data;
# each row is compared with the blind guess. Under `prompt-local` no text crosses the wire, so
# prompt inference becomes N/A, not 0.

# %%
for spec in ("noise-target", "prompt-inference"):
    row = attack_view(view, spec, cfg, RUN)
    scores = {k: round(row[k]["ssim"], 3) for k in ("image", "hint") if k in row}
    if "prompt" in row:
        scores["prompt accuracy"] = round(row["prompt"]["accuracy"], 3)
        scores["prompt chance"] = round(row["prompt"]["chance"], 3)
    print(f"{spec:18} {scores}")

# %% [markdown]
# ## What to take away
# * A split-learning server holds everything the clients sent, every step. In the paper's wire format
#   that includes eps and t, so x_t's features give the private image *exactly* (ten lines of algebra,
#   no learning), the control branch gives the private condition, and the text context gives the prompt.
# * An attack's score means something only against the blind guess.
# * FedAvg sends weights, not per-sample features: its attacks (gradient inversion) are much weaker
#   here (README, "The attack matrix"). Lab 3 asks what a split client can do about it.

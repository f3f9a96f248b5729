"""Cut points: the pieces of diffusers' UNet and ControlNet that a split can put on either side.

The forward passes below re-assemble diffusers' ``UNet2DConditionModel.forward`` and
``ControlNetModel.forward`` from the models' own sub-modules (``conv_in``,
``time_proj``, ``time_embedding``, ``add_embedding``, ``down_blocks``, ``mid_block``,
``up_blocks``, ``conv_norm_out``/``conv_act``/``conv_out``; ``controlnet_cond_embedding``,
``controlnet_down_blocks``, ``controlnet_mid_block``), so any prefix can run on one
machine and the rest on another. Tests check every split forward against diffusers'
whole forward (max abs diff <= 1e-6) for the tiny preset and the SD1.5 block layout.

Which scheme holds what is declared by each scheme in its own file (``strategies/<name>.py``:
its :class:`Cut`); this module only knows the pieces. The time embedding never crosses
the wire: the server recomputes it from t (and the context, for models with a
text-conditioned time embedding).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sim.core.autoencoder import encode_hint


@dataclass(frozen=True)
class Cut:
    """Declarative description of a scheme's split, by module name.

    Names are ``<model>.<child>`` with model in {autoencoder, text_encoder, unet,
    controlnet}; ``<model>`` alone means all of it. ``up``/``down`` name the tensors
    that cross the wire each training step (client -> server, server -> client).
    """

    scheme: str
    client: tuple[str, ...]
    client_trainable: tuple[str, ...]
    server: tuple[str, ...]
    server_trainable: tuple[str, ...]
    unused: tuple[str, ...]
    up: tuple[str, ...]
    down: tuple[str, ...]


UNET_REST = ("unet.time_proj", "unet.time_embedding", "unet.add_embedding", "unet.down_blocks",
             "unet.mid_block", "unet.up_blocks", "unet.conv_norm_out", "unet.conv_act", "unet.conv_out")
CONTROLNET_REST = ("controlnet.time_proj", "controlnet.time_embedding", "controlnet.add_embedding",
                   "controlnet.down_blocks", "controlnet.mid_block", "controlnet.controlnet_down_blocks",
                   "controlnet.controlnet_mid_block")
MODELS = ("autoencoder", "text_encoder", "unet", "controlnet")


def resolve(name: str, **models: nn.Module) -> nn.Module:
    """The module a cut entry names, e.g. ``resolve("controlnet.conv_in", controlnet=cn)``."""
    model, _, child = name.partition(".")
    if model not in models:
        raise KeyError(f"cut entry {name!r} names model {model!r}; given {sorted(models)}")
    return getattr(models[model], child) if child else models[model]


# --------------------------------------------------------------------------- pieces
def time_embedding(model: nn.Module, t: torch.Tensor, context: torch.Tensor | None,
                   dtype: torch.dtype) -> torch.Tensor:
    """``time_proj`` -> ``time_embedding`` (+ ``add_embedding`` of the context), as diffusers does."""
    emb = model.time_embedding(model.time_proj(t).to(dtype))
    kind = model.config.addition_embed_type
    if kind == "text":
        emb = emb + model.add_embedding(context)
    elif kind is not None:
        raise NotImplementedError(f"addition_embed_type={kind!r} is not supported")
    act = getattr(model, "time_embed_act", None)  # UNet only; None in every preset
    return act(emb) if act is not None else emb


def _down(model, h, emb, context):
    residuals = (h,)
    for block in model.down_blocks:
        if getattr(block, "has_cross_attention", False):
            h, res = block(hidden_states=h, temb=emb, encoder_hidden_states=context)
        else:
            h, res = block(hidden_states=h, temb=emb)
        residuals += res
    return h, residuals


def _mid(model, h, emb, context):
    if getattr(model.mid_block, "has_cross_attention", False):
        return model.mid_block(h, emb, encoder_hidden_states=context)
    return model.mid_block(h, emb)


def _batch_t(t: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(t, dtype=torch.int64, device=like.device)
    return t.expand(like.shape[0]) if t.ndim == 0 else t


def check_supported(model: nn.Module) -> None:
    """Fail loudly on diffusers options these hand-assembled forwards do not reproduce."""
    cfg = model.config
    problems = []
    if getattr(model, "encoder_hid_proj", None) is not None:
        problems.append("encoder_hid_proj")
    if cfg.get("center_input_sample", False):
        problems.append("center_input_sample")
    if getattr(model, "mid_block", None) is None:
        problems.append("mid_block=None")
    if getattr(model, "class_embedding", None) is not None:
        problems.append("class_embedding")
    if cfg.get("controlnet_conditioning_channel_order", "rgb") != "rgb":
        problems.append("controlnet_conditioning_channel_order")
    if cfg.get("global_pool_conditions", False):
        problems.append("global_pool_conditions")
    if problems:
        raise NotImplementedError(f"{type(model).__name__} uses {problems}, which the split forwards do not support")


# --------------------------------------------------------------------------- UNet halves
def unet_first_conv(unet: nn.Module, x_t: torch.Tensor) -> torch.Tensor:
    """Client side of the UNet in both split schemes: ``unet.conv_in(x_t)``."""
    return unet.conv_in(x_t)


def unet_rest(unet: nn.Module, features: torch.Tensor, t, context: torch.Tensor,
              down_residuals: list[torch.Tensor] | None = None,
              mid_residual: torch.Tensor | None = None) -> torch.Tensor:
    """Server side of the UNet: everything after ``conv_in``, with optional ControlNet residuals."""
    t = _batch_t(t, features)
    emb = time_embedding(unet, t, context, features.dtype)
    h, skips = _down(unet, features, emb, context)
    if down_residuals is not None:
        skips = tuple(s + r for s, r in zip(skips, down_residuals, strict=True))
    h = _mid(unet, h, emb, context)
    if mid_residual is not None:
        h = h + mid_residual
    up_factor = 2 ** unet.num_upsamplers
    forward_size = any(s % up_factor for s in features.shape[-2:])  # input size is conv_in's
    for i, block in enumerate(unet.up_blocks):
        n = len(block.resnets)
        res, skips = skips[-n:], skips[:-n]
        size = skips[-1].shape[2:] if (forward_size and i < len(unet.up_blocks) - 1) else None
        if getattr(block, "has_cross_attention", False):
            h = block(hidden_states=h, temb=emb, res_hidden_states_tuple=res,
                      encoder_hidden_states=context, upsample_size=size)
        else:
            h = block(hidden_states=h, temb=emb, res_hidden_states_tuple=res, upsample_size=size)
    if unet.conv_norm_out is not None:
        h = unet.conv_act(unet.conv_norm_out(h))
    return unet.conv_out(h)


# --------------------------------------------------------------------------- ControlNet halves
def control_head(controlnet: nn.Module, x_t: torch.Tensor, hint: torch.Tensor) -> torch.Tensor:
    """Vanilla client head: ``conv_in(x_t) + controlnet_cond_embedding(hint)`` (hint in [0, 1])."""
    return controlnet.conv_in(x_t) + controlnet.controlnet_cond_embedding(hint)


def nograd_control(hint_latent: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
    """No-gradient-return client's control input from the hint's latent: ``h = E(hint) + x_t``."""
    return hint_latent + x_t


def nograd_control_input(autoencoder: nn.Module, x_t: torch.Tensor, hint: torch.Tensor) -> torch.Tensor:
    """No-gradient-return client: ``h = E(hint) + x_t`` with the frozen encoder (hint in [0, 1])."""
    return nograd_control(encode_hint(autoencoder, hint), x_t)


def control_rest(controlnet: nn.Module, features: torch.Tensor, t, context: torch.Tensor
                 ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Server side of the ControlNet from its first-conv features: residuals for the UNet."""
    t = _batch_t(t, features)
    emb = time_embedding(controlnet, t, context, features.dtype)
    h, skips = _down(controlnet, features, emb, context)
    h = _mid(controlnet, h, emb, context)
    down = [block(s) for s, block in zip(skips, controlnet.controlnet_down_blocks, strict=True)]
    return down, controlnet.controlnet_mid_block(h)


def controlled_eps(unet: nn.Module, controlnet: nn.Module | None, control: torch.Tensor | None,
                   unet_features: torch.Tensor, t, context: torch.Tensor,
                   control_scale: torch.Tensor | None = None,
                   control_context: torch.Tensor | None = None) -> torch.Tensor:
    """The noise prediction from the two cut-layer tensors: the UNet's first-conv features and the
    ControlNet's (``control``; None, or ``controlnet=None``: the base model without control).

    ``control_scale`` (one factor per sample) multiplies the ControlNet's residuals; sampling
    uses 0 in the unconditional half of a guided batch. The ControlNet reads
    ``control_context`` (e.g. the empty prompt's, when prompts stay on the client) instead
    of ``context`` when given. Each scheme computes the two tensors its own way
    (``strategies.base.Scheme.cut_features``).
    """
    if controlnet is None or control is None:
        return unet_rest(unet, unet_features, t, context)
    down, mid = control_rest(controlnet, control, t, context if control_context is None else control_context)
    if control_scale is not None:
        s = control_scale.view(-1, 1, 1, 1).to(mid.dtype)
        down, mid = [d * s for d in down], mid * s
    return unet_rest(unet, unet_features, t, context, down, mid)

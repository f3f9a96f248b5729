"""Model presets and builders: one code path from a laptop CPU to Stable Diffusion 1.5.

Every preset is built from diffusers' own classes: ``UNet2DConditionModel`` (the frozen
base model), ``ControlNetModel.from_unet`` (the trainable branch, initialised from the
UNet encoder as in the ControlNet paper), DDPM/DDIM schedulers and an autoencoder slot
(see :mod:`sim.core.autoencoder`). Presets differ only in numbers:

``tiny`` (default)
    32x32 pixel-space UNet (identity autoencoder), 4 resolutions, attention at 8x8 and
    4x4 only, MiniLM token states (384-d) as cross-attention context plus an attention-
    pooled text embedding added to the time embedding (diffusers' ``addition_embed_type=
    "text"``), cosine noise schedule. Pretrained weights are committed under
    ``sim/assets/tiny-base`` (see its MODEL_CARD.md).
``sd15``
    The SD1.5 configuration (latent 4x64x64 for 512 px, 4x(r/8)x(r/8) at another resolution r,
    see :meth:`ModelPreset.at_resolution`; channels 320/640/1280/1280, CLIP text 77x768,
    scaled-linear schedule). Loads a local diffusers folder when the user
    has one; otherwise random weights, or meta-device weights for cost accounting.
``sd15-mini``
    The SD1.5 block structure at CPU size (same block types, 4 latent channels, 8x
    hint downsampling): used by tests to show the cut points hold for SD1.5's layout.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DDPMScheduler,
    UNet2DConditionModel,
)
from torch import nn

from sim.core.autoencoder import IdentityAutoencoder, KLAutoencoder
from sim.core.cuts import check_supported
from sim.core.text import CLIPTextEncoder, MiniLMTextEncoder

ASSETS = Path(__file__).resolve().parents[1] / "assets"
TINY_BASE_DIR = ASSETS / "tiny-base"
TINY_WEIGHTS = Path("unet") / "diffusion_pytorch_model.safetensors"


def configure_torch(threads: int) -> None:
    """Per-process torch settings of every job: ``threads`` intra-op threads, and denormal
    floats flushed to zero (ControlNet's zero convs and AdamW's second moments produce
    denormals, which x86 CPUs compute slowly; measured ~7% per training step here)."""
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)


def committed_tiny_base() -> Path:
    """The committed tiny base model's folder (see :func:`committed_asset`)."""
    return committed_asset(Path("tiny-base"), TINY_WEIGHTS)


def committed_asset(folder: Path, weights: Path) -> Path:
    """The folder ``sim/assets/<folder>`` that holds ``weights``.

    ``flwr run`` ships the apps as a FAB (code and text files only, 10 MB cap: no
    weights) and imports ``sim`` from that copy; then the weights come from the
    installed ``sim`` (``pip install [-e] .``), found on ``sys.path`` or through the
    import finder an editable install registers.
    """
    here = ASSETS / folder
    if (here / weights).exists():
        return here
    locations = [Path(entry or ".") / "sim" for entry in sys.path]
    for finder in sys.meta_path:  # editable installs map packages through a finder
        try:
            spec = finder.find_spec("sim", None)
        except Exception:  # noqa: BLE001 - a foreign finder may fail in any way; skip it
            continue
        if spec is not None:
            locations += [Path(p) for p in spec.submodule_search_locations or []]
    for loc in locations:
        if (loc / "assets" / folder / weights).exists():
            return loc / "assets" / folder
    return here


@dataclass(frozen=True)
class ModelPreset:
    """The numbers that define a base model; everything else is shared code."""

    name: str
    image_size: int
    latent_channels: int
    block_out_channels: tuple[int, ...]
    down_block_types: tuple[str, ...]
    up_block_types: tuple[str, ...]
    layers_per_block: int
    cross_attention_dim: int
    attention_head_dim: int
    norm_num_groups: int
    conditioning_embedding_out_channels: tuple[int, ...]
    autoencoder: str  # "identity" or "kl"
    text_encoder: str  # "minilm", "clip" or "none" (tests feed random context)
    max_tokens: int
    beta_schedule: str
    beta_start: float = 0.0001
    beta_end: float = 0.02
    num_train_timesteps: int = 1000
    addition_embed_type: str | None = None
    addition_embed_type_num_heads: int = 64
    extra_unet_kwargs: dict = field(default_factory=dict)

    @property
    def vae_factor(self) -> int:
        """Image pixels per latent pixel along a side (the autoencoder's downsampling factor)."""
        return 8 if self.autoencoder == "kl" else 1

    @property
    def latent_size(self) -> int:
        return self.image_size // self.vae_factor

    def at_resolution(self, image_size: int | None) -> "ModelPreset":
        """This preset sampling ``image_size`` px images (latent side ``image_size / vae_factor``); None or 0
        keeps its own size. A latent preset takes any multiple of its VAE's factor; a pixel-space preset
        (its UNet trained at one size) only its own size. Errors name the preset and the size."""
        if not image_size or image_size == self.image_size:
            return self
        if self.autoencoder == "identity":
            raise ValueError(f"resolution={image_size} is not supported by model={self.name!r}: it was trained at "
                             f"{self.image_size} px only; use resolution={self.image_size} (or 0)")
        if image_size < self.vae_factor or image_size % self.vae_factor:
            raise ValueError(f"resolution={image_size} must be a positive multiple of {self.vae_factor} "
                             f"(model={self.name!r}'s VAE downsampling factor)")
        return self.replace(image_size=int(image_size))

    def replace(self, **changes) -> "ModelPreset":
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown model preset field(s) {sorted(unknown)}")
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, ModelPreset] = {
    "tiny": ModelPreset(
        name="tiny",
        image_size=32,
        latent_channels=3,
        block_out_channels=(32, 64, 64, 64),
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        cross_attention_dim=384,
        attention_head_dim=8,
        norm_num_groups=8,
        conditioning_embedding_out_channels=(16,),
        autoencoder="identity",
        text_encoder="minilm",
        max_tokens=16,
        beta_schedule="squaredcos_cap_v2",
        addition_embed_type="text",
        addition_embed_type_num_heads=8,
    ),
    "sd15": ModelPreset(
        name="sd15",
        image_size=512,
        latent_channels=4,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=2,
        cross_attention_dim=768,
        attention_head_dim=8,
        norm_num_groups=32,
        conditioning_embedding_out_channels=(16, 32, 96, 256),
        autoencoder="kl",
        text_encoder="clip",
        max_tokens=77,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
    ),
}
PRESETS["sd15-mini"] = PRESETS["sd15"].replace(
    name="sd15-mini",
    image_size=64,
    block_out_channels=(32, 32, 64, 64),
    cross_attention_dim=32,
    attention_head_dim=4,
    norm_num_groups=8,
    conditioning_embedding_out_channels=(8, 8, 16, 16),
    text_encoder="none",
    max_tokens=8,
    extra_unet_kwargs={"vae_block_out_channels": (8, 8, 16, 16)},
)


def get_preset(name: str) -> ModelPreset:
    """Return the preset called ``name``; unknown names fail listing the known ones."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


def unet_config(p: ModelPreset) -> dict:
    """The ``UNet2DConditionModel`` config of a preset."""
    cfg = dict(
        sample_size=p.latent_size,
        in_channels=p.latent_channels,
        out_channels=p.latent_channels,
        block_out_channels=p.block_out_channels,
        down_block_types=p.down_block_types,
        up_block_types=p.up_block_types,
        layers_per_block=p.layers_per_block,
        cross_attention_dim=p.cross_attention_dim,
        attention_head_dim=p.attention_head_dim,
        norm_num_groups=p.norm_num_groups,
    )
    if p.addition_embed_type is not None:
        cfg.update(addition_embed_type=p.addition_embed_type,
                   addition_embed_type_num_heads=p.addition_embed_type_num_heads)
    return cfg


def build_unet(p: ModelPreset, seed: int = 0, device: str = "cpu"):
    """A randomly initialised (seeded) UNet of preset ``p``; ``device="meta"`` allocates nothing."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device(device):
            return UNet2DConditionModel(**unet_config(p))


def build_controlnet(unet, p: ModelPreset):
    """ControlNet initialised from the UNet's encoder, as diffusers' ``from_unet`` does, zero convs at 0.

    ``from_unet`` forgets ``addition_embed_type_num_heads``, so its text-pooling
    ``add_embedding`` would compute a different function from the UNet's with the same
    weights; we take its config, restore that field, and copy the encoder weights.
    """
    with torch.device("meta"):
        template = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=p.conditioning_embedding_out_channels,
                                             load_weights_from_unet=False)
    config = {k: v for k, v in template.config.items() if not k.startswith("_")}  # "_use_default_values" would win
    config["addition_embed_type_num_heads"] = unet.config.addition_embed_type_num_heads
    device = next(unet.parameters()).device
    with torch.device(device):
        controlnet = ControlNetModel.from_config(config)

    check_supported(controlnet)
    if device.type != "meta":
        for name in ("conv_in", "time_proj", "time_embedding", "add_embedding", "down_blocks", "mid_block"):
            if getattr(controlnet, name, None) is not None:
                getattr(controlnet, name).load_state_dict(getattr(unet, name).state_dict())
    return controlnet


def build_autoencoder(p: ModelPreset, folder: str | None = None, device: str = "cpu") -> nn.Module:
    """The autoencoder slot: identity for pixel presets, AutoencoderKL for SD presets."""
    if p.autoencoder == "identity":
        return IdentityAutoencoder()

    if folder is not None:
        return KLAutoencoder(AutoencoderKL.from_pretrained(folder, subfolder="vae", local_files_only=True))
    channels = p.extra_unet_kwargs.get("vae_block_out_channels", (128, 256, 512, 512))
    with torch.device(device):
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=p.latent_channels,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=channels, layers_per_block=2,
            norm_num_groups=min(32, channels[0]), sample_size=p.image_size, scaling_factor=0.18215,
        )
    return KLAutoencoder(vae)


def build_text_encoder(p: ModelPreset, folder: str | None = None, device: str = "cpu"):
    """The frozen text encoder of a preset (None for test presets fed random context)."""
    if p.text_encoder == "minilm":
        return MiniLMTextEncoder(max_tokens=p.max_tokens)
    if p.text_encoder == "clip":
        return CLIPTextEncoder(folder=folder, max_tokens=p.max_tokens, device=device)
    return None


def scheduler_config(p: ModelPreset) -> dict:
    """Noise schedule shared by the DDPM (training) and DDIM (sampling) schedulers."""
    return dict(num_train_timesteps=p.num_train_timesteps, beta_schedule=p.beta_schedule,
                beta_start=p.beta_start, beta_end=p.beta_end, prediction_type="epsilon",
                clip_sample=False)


def ddpm_scheduler(p: ModelPreset):
    return DDPMScheduler(**scheduler_config(p))


SCHEDULER_KEYS = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end")  # what a folder's schedule sets
SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read it ({type(e).__name__}: {e})") from None


def check_base_folder(preset: str | ModelPreset, folder: str | Path) -> ModelPreset:
    """Check that ``folder`` is a local diffusers folder that ``preset`` can use, reading its configs only
    (before any work); returns the preset with the folder's noise schedule (``scheduler/``, when present).

    Fails naming the folder and the preset: a missing folder (FileNotFoundError: it is never looked up
    on a model hub), no ``unet/config.json``, a latent-space folder (``vae/``) for a pixel-space preset or
    the reverse, latent channels or a cross-attention width that differ from what the preset's
    autoencoder and text encoder produce, or a schedule the project cannot train (not epsilon
    prediction, explicit betas, an unknown beta schedule).
    """
    p = get_preset(preset) if isinstance(preset, str) else preset
    path = Path(folder)
    where = f"base-model={str(folder)!r}"
    if not path.is_dir():
        raise FileNotFoundError(f"{where}: no such local folder (base models are never downloaded; give the path "
                                f"of a diffusers folder with unet/{', vae/, text_encoder/, tokenizer/' if p.autoencoder == 'kl' else ''})")
    if not (path / "unet" / "config.json").is_file():
        make = f"; make one with `splitcontrol pretrain-base --out {path}`" if p.name == "tiny" else ""
        raise FileNotFoundError(f"{where}: no unet/config.json in it: not a diffusers model folder{make}")
    unet = _json(path / "unet" / "config.json")
    has_vae = (path / "vae" / "config.json").is_file()
    if p.autoencoder == "kl" and not has_vae:
        raise ValueError(f"{where} has no vae/ (a pixel-space model?) but model={p.name!r} is a latent-diffusion "
                         "preset that needs one; for a pixel-space folder use model=tiny")
    if p.autoencoder == "identity" and has_vae:
        raise ValueError(f"{where} is a latent-diffusion folder (it has vae/) but model={p.name!r} is a pixel-space "
                         "preset; set model=sd15")
    channels = unet.get("in_channels")
    if channels != p.latent_channels or unet.get("out_channels", channels) != channels:
        raise ValueError(f"{where}: its UNet takes in_channels={channels} (out_channels={unet.get('out_channels')}) "
                         f"but model={p.name!r} has {p.latent_channels} latent channels; pick the model preset of "
                         f"this folder (tiny: 3 pixel channels, sd15: 4 latent channels)")
    if has_vae:
        vae = _json(path / "vae" / "config.json")
        if vae.get("latent_channels") != channels:
            raise ValueError(f"{where}: vae/ has latent_channels={vae.get('latent_channels')} but unet/ takes "
                             f"{channels} (model={p.name!r})")
        blocks = vae.get("block_out_channels")
        if isinstance(blocks, list) and 2 ** (len(blocks) - 1) != p.vae_factor:
            raise ValueError(f"{where}: vae/ downsamples by {2 ** (len(blocks) - 1)} ({len(blocks)} blocks) but "
                             f"model={p.name!r} assumes {p.vae_factor}")
    width = unet.get("cross_attention_dim")
    if p.text_encoder == "clip":
        if not (path / "text_encoder" / "config.json").is_file() or not (path / "tokenizer").is_dir():
            raise FileNotFoundError(f"{where}: model={p.name!r} needs the folder's text_encoder/ and tokenizer/")
        hidden = _json(path / "text_encoder" / "config.json").get("hidden_size")
        if hidden != width:
            raise ValueError(f"{where}: text_encoder/ has hidden_size={hidden} but the UNet's cross_attention_dim is "
                             f"{width} (model={p.name!r})")
    elif p.text_encoder == "minilm" and width != p.cross_attention_dim:
        raise ValueError(f"{where}: its UNet's cross_attention_dim={width} but model={p.name!r} feeds "
                         f"{p.cross_attention_dim}-d MiniLM states; for an SD folder set model=sd15")
    sched_file = path / "scheduler" / "scheduler_config.json"
    if not sched_file.is_file():
        return p
    sched = _json(sched_file)
    problems = []
    if sched.get("prediction_type", "epsilon") != "epsilon":
        problems.append(f"prediction_type={sched['prediction_type']!r} (the project trains epsilon prediction)")
    if sched.get("trained_betas") is not None:
        problems.append("explicit trained_betas")
    if sched.get("beta_schedule", p.beta_schedule) not in SCHEDULES:
        problems.append(f"beta_schedule={sched['beta_schedule']!r} (supported: {', '.join(SCHEDULES)})")
    if problems:
        raise ValueError(f"{where}: scheduler/scheduler_config.json has {'; '.join(problems)}")
    return p.replace(**{k: sched[k] for k in SCHEDULER_KEYS if k in sched})


@dataclass
class BaseModel:
    """The frozen, public, pretrained parts every scheme starts from."""

    preset: ModelPreset
    unet: nn.Module
    autoencoder: nn.Module
    text_encoder: nn.Module | None

    def freeze(self) -> "BaseModel":
        for m in (self.unet, self.autoencoder, self.text_encoder):
            if m is not None:
                m.eval().requires_grad_(False)
        return self

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        return self.text_encoder(list(prompts))


def load_base(preset: str = "tiny", folder: str | Path | None = None, device: str = "cpu",
              seed: int = 0, image_size: int | None = None) -> BaseModel:
    """Load the frozen base model of a preset.

    ``tiny`` loads the committed checkpoint (``folder`` overrides its location; a
    missing checkpoint is an error telling how to make it). ``sd15`` loads a local
    diffusers folder (subfolders unet/, vae/, text_encoder/, tokenizer/) when given,
    otherwise builds random weights (``device="meta"`` for accounting without memory).
    A given folder is checked against the preset first (:func:`check_base_folder`), and its
    ``scheduler/`` config, when present, sets the noise schedule (the returned preset's).
    ``image_size`` (a config's ``resolution``; None = the preset's own) sets the size the base
    samples and trains at (:meth:`ModelPreset.at_resolution`): the returned preset's
    ``image_size`` / ``latent_size`` and the UNet's ``config.sample_size`` (the latent side the
    server's wire check expects) agree with it. Nothing is ever downloaded.
    """

    p = get_preset(preset).at_resolution(image_size)
    if folder is not None:
        p = check_base_folder(p, folder)
    if p.name == "tiny":
        path = Path(folder) if folder is not None else committed_tiny_base()
        if not (path / "unet" / "config.json").exists():
            raise FileNotFoundError(
                f"no tiny base model at {path}; make one with `splitcontrol pretrain-base --out {path}`")
        unet = UNet2DConditionModel.from_pretrained(path / "unet", local_files_only=True).to(device)
        check_supported(unet)
        return BaseModel(p, unet, build_autoencoder(p), build_text_encoder(p)).freeze()
    if folder is not None:
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", local_files_only=True).to(device)
        unet.register_to_config(sample_size=p.latent_size)  # the folder's default size gives way to resolution
        unet.sample_size = p.latent_size
    else:
        unet = build_unet(p, seed=seed, device=device)
    check_supported(unet)
    return BaseModel(p, unet, build_autoencoder(p, folder, device),
                     build_text_encoder(p, folder, device)).freeze()


def count_params(module: nn.Module | None, trainable_only: bool = False) -> int:
    if module is None:
        return 0
    return sum(q.numel() for q in module.parameters() if q.requires_grad or not trainable_only)


def load_controlnet(path: str | Path) -> ControlNetModel:
    """A saved ControlNet (diffusers folder), or a ValueError naming the folder (truncated, foreign, ...)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is missing: the run did not save this ControlNet")
    try:
        return ControlNetModel.from_pretrained(path).eval()
    except Exception as e:  # safetensors, JSON and shape errors alike: name the file, not the library's frames
        raise ValueError(f"{path}: cannot load the saved ControlNet ({type(e).__name__}: {str(e)[:200]}); "
                         "the file may be truncated: re-run the compare") from None


def load_pickled(path: str | Path):
    """A file written with ``torch.save`` (kept messages), or a ValueError naming it."""
    path = Path(path)
    try:
        return torch.load(path, weights_only=False)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise ValueError(f"{path}: cannot read it ({type(e).__name__}: {str(e)[:200]}); the file may be "
                         "truncated: re-run the compare that wrote it") from None

"""A tiny Stable-Diffusion-layout folder for tests, built with diffusers' and transformers' own classes.

``make_sd_folder(path)`` writes ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
``scheduler/`` and ``model_index.json`` as ``StableDiffusionPipeline.save_pretrained`` lays
them out: the sd15-mini shapes (a few MB), random seeded weights, a CLIP tokenizer whose
vocabulary is the 256 byte characters (no merges), so nothing is downloaded.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch


def _byte_chars() -> list[str]:
    """The 256 characters GPT-2 / CLIP byte-level BPE maps the bytes to (transformers' bytes_to_unicode)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def make_sd_folder(path: str | Path, seed: int = 0) -> Path:
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from sim.core.models import build_autoencoder, get_preset, scheduler_config, unet_config

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    p = get_preset("sd15-mini")
    torch.manual_seed(seed)
    UNet2DConditionModel(**unet_config(p)).save_pretrained(path / "unet")
    build_autoencoder(p).vae.save_pretrained(path / "vae")
    DDPMScheduler(**scheduler_config(p)).save_pretrained(path / "scheduler")
    chars = _byte_chars()
    vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    tok_dir = path / "tokenizer"
    tok_dir.mkdir(exist_ok=True)
    (tok_dir / "vocab.json").write_text(json.dumps(vocab))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt")).save_pretrained(tok_dir)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=p.cross_attention_dim,
                                        intermediate_size=2 * p.cross_attention_dim, num_hidden_layers=1,
                                        num_attention_heads=4, max_position_embeddings=77,
                                        projection_dim=p.cross_attention_dim, bos_token_id=vocab["<|startoftext|>"],
                                        eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"]))
    text.save_pretrained(path / "text_encoder")
    (path / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDPMScheduler"]}))
    return path

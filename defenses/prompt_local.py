"""Prompt protection (the paper's): the prompt, its token ids and its embedding never leave the client.

Hook: prompt. Split clients send no context field at all (not a zero tensor); the
server's ControlNet and UNet use the public embedding of the empty prompt in training,
and the ControlNet keeps the empty prompt at inference (the UNet gets the prompt on
the user's side, where it lives). Schemes: every split scheme (FedAvg never sends prompts:
only weights cross). A wire audit test checks a whole protected transcript for prompt
strings, token ids and embeddings.
Threat model: removes the direct text channel; what the images themselves imply about
the prompt (e.g. colours in the features) is not hidden -- prompt-inference attacks
measure that.
"""
from __future__ import annotations

from .base import Defense, register


@register
class PromptLocal(Defense):
    """Keep prompts on the client: no text context crosses the wire; the server uses the empty prompt."""

    name = "prompt-local"
    hooks = ("prompt",)
    why_not = "FedAvg never sends prompts or features: only weights cross"
    sends_prompt = False
    threat_model = "no text leaves; image-implied prompt content is not hidden"

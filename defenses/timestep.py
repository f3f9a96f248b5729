"""Truncated timestep policy (the paper's): t ~ U{t_start, ..., T-1} instead of U{0, ..., T-1}.

Hook: timestep. Schemes: every split scheme (FedAvg sends no per-step features).
Large t means a small sqrt(abar_t), so less of the private latent z0 in what is sent.
``t-start=0`` is the uniform policy every scheme uses by default. The paper's examples:
14, 226, 536. Threat model: helps only against an attacker who does NOT learn the noise
target eps; a server that receives eps (the reference design) subtracts it
(see attacks/noise_target.py) and the policy alone then protects nothing.
"""
from __future__ import annotations

from .base import Defense, register


@register
class TimestepTruncated(Defense):
    """Sample training timesteps from U{t_start..T-1} (t-start=0: the uniform policy)."""

    name = "timestep"
    hooks = ("timestep",)
    why_not = "FedAvg sends no per-step features, so the training timesteps are never exposed"
    params = {"t-start": 0}
    at_inference = False
    threat_model = "hides little on its own: x_t minus the sent noise target still reveals sqrt(abar_t) z0"

    def validate(self) -> None:
        if self.p["t-start"] < 0:
            raise ValueError(f"defense 'timestep': t-start must be >= 0, got {self.p['t-start']}")

    def t_start(self, scheduler) -> int:
        T = scheduler.config.num_train_timesteps
        if self.p["t-start"] >= T:
            raise ValueError(f"defense 'timestep': t-start={self.p['t-start']} must be < T={T}")
        return self.p["t-start"]

"""Gradient inversion on FedAvg updates ("Inverting Gradients", Geiping et al. 2020; DLG family).

Threat model: honest-but-curious FedAvg server. It sees, per round and client, the
global ControlNet it sent and the local one that came back, and knows the public recipe
(lr, local steps, batch size, AdamW with torch's defaults: strategies/fedavg.py), the
public frozen base model and auxiliary data. It reconstructs the client's first batch
of the round: target image, hint and prompt. It needs stateless clients
(``fedavg-keep-optimizer=false``, as the presets that run it set): by default a client
keeps its AdamW moments between rounds, private state that step 1 cannot unwind (N/A).

1. The update, unwound. A client's first AdamW step from a fresh optimizer moves every
   weight by lr * g / (|g| + eps_adam) (m_hat = g, v_hat = g^2) after decoupled weight
   decay. With one local step the server therefore recovers the *exact* gradient,
   g = eps_adam * d / (1 - |d|) with d = (w_global (1 - lr wd) - w_local) / lr, up to
   float32 rounding (cosine 0.99999 with the true gradient on the tiny preset; tiny
   gradients, which Adam blows up to full-size steps, come back best). With k > 1
   local steps only the mean update direction (w_global (1 - lr wd)^k - w_local) / (k lr)
   is available: a sum of k sign-like Adam steps on k different batches.
2. Analytic pieces (batch 1; rounds where the ControlNet's inner layers get gradient,
   i.e. after its zero convolutions have left 0, from round 2 on):
   * t: ``time_embedding.linear_1`` sees one input vector, the sinusoidal embedding of
     t, so its weight gradient is rank one, ``outer(delta, proj(t))``, and
     ``proj(t) = dW^T db / |db|^2``; the nearest of the T embeddings gives t exactly.
   * the prompt: every cross-attention ``to_k``/``to_v`` weight gradient has its rows in
     the span of the text context's token vectors; the candidate prompt (the auxiliary
     data's prompts and "") whose token span leaves the least residual is the prompt.
3. The image prior: the mean auxiliary image with the recovered prompt (the aux data's
   prompts name the colours under Fill50K; a constant prompt, as for faces, gives the
   mean face). ``prior-steps`` > 0 uses the public base model's DDIM sample for the
   prompt instead (worse on the tiny base: SSIM 0.20 against 0.39).
4. Optimisation (Geiping et al.; ``iters`` > 0): the unknown image z0 (tanh-bounded),
   noise eps and hint (sigmoid-bounded), with x_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps
   at the recovered t, are fitted with Adam so that the simulated gradient of the
   client's loss (same loss weighting, same context) matches the observed one: mean over
   weight tensors of (1 - cosine), plus total variation on image and hint; z0 starts at
   the prior, the hint at the aux mean hint, eps at 0. (The noise-free x0 approximation
   is not used: eps is a free variable.)

What it reaches (tiny preset, CPU, batch 1, 1 local step, round >= 2; measured on a
smoke run): t and the prompt as used in training (after prompt dropout) exactly, in
6 of 6 and 6 of 6 updates (t from 25 to 902); the image through the prompt prior: SSIM
0.68 where the prompt was kept (the background colour is right; the circle is a blur),
0.39 over all six. The optimisation does not help at the budget a CPU affords: 40
iterations (60 s; a double backward pass through UNet and ControlNet per iteration) took
one image from SSIM 0.68 to 0.43 (eps and z0 trade off; the gradient cosine still rose
to 0.81) and left the hint at SSIM 0.02-0.04, below a blind all-black guess (~0.55). So
``iters`` defaults to 0; Geiping et al. used thousands of iterations. Batches > 1 and
k > 1 local steps: t and the prompt are mixtures and are not recovered (the rank-one
tests fail and say so in ``info``); a batch's reconstruction is unordered (which sample
is which is not identifiable from a summed gradient), so per-ref scores are a lower
bound, and only the first local step's batch is attacked.

Why no analytic hint from the first layer: ``controlnet_cond_embedding.conv_in`` is a
3x3 convolution, so its weight gradient sums over all 1024 pixels (432 numbers plus 16
for the bias against 3072 hint values), unlike the fully connected first layers where
``dW / db`` is the input; and in round 1 it gets no gradient at all (the hint block's
output conv and the zero convolutions start at 0).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from sim.core.diffusion import ddim_sample
from strategies.base import TrainSettings, composed_eps, diffusion_loss

from .base import Attack, Reconstruction, ServerView, register

ADAM_EPS = 1e-8  # torch.optim.AdamW defaults, as the FedAvg client uses them (strategies/fedavg.py)
ADAM_WD = 1e-2


def unwind_update(global_sd: dict, local_sd: dict, lr: float, local_steps: int, names) -> dict:
    """The client's gradient (1 local step: exact) or mean update direction (k > 1 steps) per weight."""
    out = {}
    for n in names:
        w0, w1 = global_sd[n].double(), local_sd[n].double()
        if local_steps == 1:
            d = (global_sd[n].float() * (1 - lr * ADAM_WD) - local_sd[n].float()).double() / lr
            out[n] = (ADAM_EPS * d / (1 - d.abs()).clamp_min(1e-6)).float()
        else:
            out[n] = ((w0 * (1 - lr * ADAM_WD) ** local_steps - w1) / (local_steps * lr)).float()
    return out


def recover_timestep(grads: dict, time_proj, num_train_timesteps: int) -> tuple[int | None, float]:
    """t from the rank-one gradient of ``time_embedding.linear_1`` (batch 1); (None, residual) if not rank one."""
    w, b = grads.get("time_embedding.linear_1.weight"), grads.get("time_embedding.linear_1.bias")
    if w is None or b is None or float(b.norm()) == 0.0:
        return None, 1.0
    proj = (b.double() @ w.double()) / (b.double() @ b.double())
    residual = float((w.double() - torch.outer(b.double(), proj)).norm() / w.double().norm())
    table = time_proj(torch.arange(num_train_timesteps)).double()
    t = int((table - proj).norm(dim=1).argmin())
    return (t if residual < 0.05 else None), residual


def recover_prompt(grads: dict, candidates: list[str], embeddings: torch.Tensor) -> tuple[int | None, float]:
    """Index of the candidate whose token span best contains the cross-attention K/V weight gradients."""
    rows = [g for n, g in grads.items() if ("attn2.to_k" in n or "attn2.to_v" in n) and n.endswith("weight")]
    if not rows:
        return None, 1.0
    rows = torch.cat(rows).double()
    if float(rows.norm()) == 0.0:
        return None, 1.0
    res = []
    for e in embeddings.double():
        tokens = e[e.abs().sum(1) > 0]
        if tokens.shape[0] == 0:  # an all-zero context spans nothing
            res.append(1.0)
            continue
        q, _ = torch.linalg.qr(tokens.T)
        res.append(float((rows - rows @ q @ q.T).norm() / rows.norm()))
    i = min(range(len(res)), key=res.__getitem__)
    return (i if res[i] < 1e-2 else None), res[i]


def total_variation(x: torch.Tensor) -> torch.Tensor:
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


@register
class GradInversion(Attack):
    """Unwind the FedAvg client's AdamW step; t and prompt from rank-one gradients; image prior; cosine matching."""

    name = "grad-inversion"
    needs = ("fl-updates",)
    client_parts = ("whole",)
    why_not = "needs FL model updates"
    targets = ("image", "hint", "prompt")
    params = {"max-updates": 1, "skip-first-round": True, "iters": 0, "lr": 0.05, "tv": 0.01,
              "prior-steps": 0, "fit-image": True, "aux": 1024, "seed": 0}
    threat_model = ("honest-but-curious FedAvg server reading (global, local) weights per round, with the "
                    "public recipe, base model and auxiliary data")

    def not_applicable(self, view: ServerView) -> str | None:
        if getattr(view.cfg, "fedavg_keep_optimizer", False) and view.client_part == "whole":
            return ("unwinding an update to its gradient assumes each round starts a fresh AdamW; with "
                    "fedavg-keep-optimizer the clients' moments are private state the server does not see")
        return super().not_applicable(view)

    def run(self, view: ServerView) -> Reconstruction:
        from torch.nn.attention import (  # double backward needs the math kernel
            SDPBackend,
            sdpa_kernel,
        )

        torch.manual_seed(self.p["seed"])
        updates = view.updates()
        if self.p["skip-first-round"]:  # round 1 starts at the zero-initialised ControlNet: least to read
            later = [u for u in updates if view.messages[u["ref"][0]]["stat"]["round"] > 1]
            updates = later or updates
        aux = view.aux(self.p["aux"])
        candidates = sorted(set(aux["prompt"]) | {""})
        cand_emb = view.base.encode_prompts(candidates)
        refs, images, hints, prompts, info = [], [], [], [], {"t_recovered": [], "t_residual": [],
                                                             "prompt_residual": [], "gradient_cosine": []}
        for u in updates[: self.p["max-updates"]]:
            with sdpa_kernel(SDPBackend.MATH):
                z0, hint, prompt, extra = self._invert(view, u, aux, candidates, cand_emb)
            for k, v in extra.items():
                info[k].append(v)
            b = z0.shape[0]
            refs += [(u["ref"][0], 0, j) for j in range(b)]
            images.append(view.base.autoencoder.decode(z0).clamp(-1, 1))
            hints.append(hint)
            prompts += [prompt] * b
        info["candidates"] = candidates
        return Reconstruction(refs, torch.cat(images), torch.cat(hints), prompts, info=info)

    # ------------------------------------------------------------------ one update
    def _invert(self, view: ServerView, u: dict, aux: dict, candidates, cand_emb):
        p, cfg, sched = self.p, view.cfg, view.scheduler
        settings = TrainSettings.from_config(cfg)
        cn = copy.deepcopy(view.controlnet_init)
        cn.load_state_dict(u["global"])
        cn.train().requires_grad_(True)
        names = [n for n, _ in cn.named_parameters()]
        grads = unwind_update(u["global"], u["local"], cfg.lr, u["local_steps"], names)
        batch = cfg.batch_size  # the round's first local step (public recipe)
        # rank-one tests: they pass for one sample's gradient and fail (saying so) for mixtures
        t_hat, t_res = recover_timestep(grads, cn.time_proj, sched.config.num_train_timesteps)
        c_idx, c_res = recover_prompt(grads, candidates, cand_emb)
        if batch > 1:
            t_hat, c_idx = None, None
        t_val = t_hat if t_hat is not None else sched.config.num_train_timesteps // 2
        prompt = candidates[c_idx] if c_idx is not None else ""
        ctx = view.base.encode_prompts([prompt] * batch)
        t = torch.full((batch,), t_val, dtype=torch.int64)
        abar = sched.alphas_cumprod[t].float().view(-1, 1, 1, 1)

        z_init = self._prior(view, ctx, aux, batch, prompt)
        u_img = torch.atanh(z_init.clamp(-0.98, 0.98)).requires_grad_(True)
        eps = torch.zeros_like(z_init, requires_grad=True)
        h_init = aux["condition"].mean(0, keepdim=True).clamp(0.02, 0.98).expand(batch, -1, -1, -1)
        h_logit = torch.logit(h_init).clone().requires_grad_(True)
        params = [prm for n, prm in cn.named_parameters()]
        keep = [i for i, n in enumerate(names) if float(grads[n].abs().sum()) > 0]
        target = [grads[names[i]].flatten() for i in keep]
        opt = torch.optim.Adam(([u_img] if p["fit-image"] else []) + [eps, h_logit], lr=p["lr"])
        cos = torch.tensor(0.0)
        for _ in range(p["iters"]):
            z0 = torch.tanh(u_img)
            hint = torch.sigmoid(h_logit)
            x_t = abar.sqrt() * z0 + (1 - abar).sqrt() * eps
            eps_hat = composed_eps(view.strategy, view.base, cn, x_t, t, ctx, hint)  # the client's whole model
            loss = diffusion_loss(eps_hat, eps, t, sched, settings)
            sim = torch.autograd.grad(loss, [params[i] for i in keep], create_graph=True)
            cos = torch.stack([F.cosine_similarity(s.flatten(), g, dim=0, eps=1e-30)
                               for s, g in zip(sim, target)]).mean()
            obj = (1 - cos) + p["tv"] * (total_variation(z0) + total_variation(hint))
            opt.zero_grad(set_to_none=True)
            obj.backward()
            opt.step()
        cn.requires_grad_(False)
        extra = {"t_recovered": t_hat, "t_residual": round(t_res, 6), "prompt_residual": round(c_res, 6),
                 "gradient_cosine": round(float(cos.detach()), 4)}
        return torch.tanh(u_img).detach(), torch.sigmoid(h_logit).detach(), prompt, extra

    def _prior(self, view: ServerView, ctx: torch.Tensor, aux: dict, batch: int, prompt: str) -> torch.Tensor:
        """The image prior: the mean auxiliary image with the recovered prompt (all of them if none has it),
        or with ``prior-steps`` > 0 the base model's DDIM sample for that prompt."""
        if self.p["prior-steps"] <= 0:
            same = [i for i, q in enumerate(aux["prompt"]) if q == prompt and prompt]
            pool = aux["target"][same] if same else aux["target"]
            return pool.mean(0, keepdim=True).expand(batch, -1, -1, -1).clone()

        unet = view.base.unet
        null = view.base.encode_prompts([""])
        gen = torch.Generator().manual_seed(self.p["seed"])
        shape = (batch, view.base.preset.latent_channels, view.base.preset.latent_size, view.base.preset.latent_size)
        z = ddim_sample(lambda x, t, c: unet(x, t, encoder_hidden_states=c).sample, view.scheduler, shape, ctx,
                        null, steps=self.p["prior-steps"], guidance=5.0, generator=gen)
        return view.base.autoencoder.decode(z).clamp(-1, 1)

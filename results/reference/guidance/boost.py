"""Issue 18: where in the sampling steps the control must win (not part of the package).

Samples a finished run's ControlNets again on its 128 eval conditions with a per-timestep recipe
and appends one JSON line per (scheme, recipe): outline IoU, colour accuracy and the indices of
the conditions whose colours came out wrong. Run from the repository root:

    python results/reference/guidance/boost.py RUN_DIR OUT.jsonl SCHEMES RECIPES_JSON

RECIPES_JSON: a list of dicts; keys (absent: the run's config): ``cg`` the control's guidance,
``hi`` a timestep above which ``cg_hi`` (the control's) and ``g_hi`` (the prompt's guidance)
replace ``cg`` and the prompt's guidance, ``mf`` (true) the control's direction h - u without its
spatial mean. ``control-boost`` in the package is ``cg_hi = boost * cg`` with ``g_hi`` = the prompt's.
"""
import json
import sys
import time

import numpy as np
import torch

from sim.core.diffusion import ddim_sample, to_uint8
from sim.core.metrics import measure_colours, outline_iou_per_image
from sim.core.models import ddpm_scheduler, load_controlnet
from sim.engine.clientside import load_run_config
from sim.engine.context import context_for
from sim.engine.evaluate import conditions_uint8
from strategies import get_strategy
from strategies.base import composed_eps

torch.set_num_threads(1)
run, out, schemes, recipes = sys.argv[1], sys.argv[2], sys.argv[3].split(","), json.loads(sys.argv[4])
cfg = load_run_config(run)
ctx = context_for(cfg)
base, es = ctx.base, ctx.eval_set
n, p = len(es["prompt"]), base.preset
prompt, null = base.encode_prompts(es["prompt"]), base.encode_prompts([""]).expand(n, -1, -1)
hints, conds, sched = es["condition"], conditions_uint8(es["condition"]), ddpm_scheduler(p)
for scheme in schemes:
    strategy, cn = get_strategy(scheme), load_controlnet(f"{run}/controlnet_{scheme}")
    for r in recipes:
        def eps(x, step, r=r):
            t = torch.full((n,), step, dtype=torch.int64)
            high = step > r.get("hi", 10 ** 9)
            g = r.get("g_hi", cfg.guidance) if high else cfg.guidance
            cg = r.get("cg", cfg.control_guidance)
            cg = r.get("cg_hi", cg) if high else cg
            u = composed_eps(None, base, None, x, t, null, None)
            h = composed_eps(strategy, base, cn, x, t, null, hints)
            c = composed_eps(strategy, base, cn, x, t, prompt, hints)
            d = h - u
            if r.get("mf"):
                d = d - d.mean((2, 3), keepdim=True)
            return u + cg * d + g * (c - h)

        t0 = time.time()
        z = ddim_sample(eps, sched, (n, p.latent_channels, p.latent_size, p.latent_size), steps=cfg.ddim_steps,
                        generator=torch.Generator().manual_seed(cfg.seed))
        u8 = to_uint8(base.autoencoder.decode(z))
        ious = outline_iou_per_image(u8, conds)
        measured = [measure_colours(im) for im in u8]
        ok = np.array([m == (f, b) for m, f, b in zip(measured, es["fg"], es["bg"])])
        row = {"run": run, "seed": cfg.seed, "scheme": scheme, **r, "iou": round(float(ious.mean()), 4),
               "iou_se": round(float(ious.std(ddof=1) / np.sqrt(n)), 4), "colour": float(ok.mean()),
               "fails": [int(i) for i in np.where(~ok)[0]], "s": round(time.time() - t0)}
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(row, flush=True)

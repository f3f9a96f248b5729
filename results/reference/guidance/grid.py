"""Sampling-recipe grid on a finished run's ControlNets (issue 18 experiment; not committed)."""
import json, sys, time
import numpy as np, torch
from sim.engine.clientside import load_run_config
from sim.engine.context import context_for
from sim.core.models import load_controlnet
from sim.core.diffusion import to_uint8
from sim.engine.evaluate import generate, score, conditions_uint8
from sim.core.metrics import outline_iou_per_image, measure_colours

run, scheme, out = sys.argv[1], sys.argv[2], sys.argv[3]
configs = json.loads(sys.argv[4])
n = int(sys.argv[5]) if len(sys.argv) > 5 else 128
steps = int(sys.argv[6]) if len(sys.argv) > 6 else 50
torch.set_num_threads(1)
cfg = load_run_config(run, [f"eval-samples={n}"])
ctx = context_for(cfg)
base, es = ctx.base, ctx.eval_set
cn = None if scheme == "base" else load_controlnet(f"{run}/controlnet_{scheme}")
conds = conditions_uint8(es["condition"])
for c in configs:
    t0 = time.time()
    imgs = generate(base, es["prompt"], None if scheme == "base" else scheme, cn, es["condition"], steps=steps,
                    guidance=c.get("guidance", 7.5), seed=cfg.seed, progress=False,
                    control_guidance=c.get("cg"), control_from=c.get("from", 0), uncond_control=c.get("uc", False))
    u8 = to_uint8(imgs)
    ious = outline_iou_per_image(u8, conds)
    meas = [measure_colours(im) for im in u8]
    fg = np.array([m[0] == f for m, f in zip(meas, es["fg"])]); bg = np.array([m[1] == b for m, b in zip(meas, es["bg"])])
    row = {"scheme": scheme, **c, "n": n, "steps": steps, "iou": float(ious.mean()), "iou_se": float(ious.std(ddof=1)/np.sqrt(n)),
           "colour": float((fg & bg).mean()), "fg": float(fg.mean()), "bg": float(bg.mean()), "s": round(time.time()-t0, 1),
           "iou_per": ious.tolist(), "colour_per": (fg & bg).astype(int).tolist()}
    with open(out, "a") as f:
        f.write(json.dumps(row) + "\n")
    print({k: v for k, v in row.items() if not k.endswith("_per")}, flush=True)

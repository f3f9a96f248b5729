"""The release check alone on finished runs' saved ControlNets, through the code path of run_job and
`splitcontrol evaluate` (sim.engine.runner.checked_release). Run from the repository root:

    python results/reference/defense-sweep/release_check.py OUT.jsonl N RUN_DIR [RUN_DIR ...]
"""
import json, sys, time
import torch
from sim.core.models import load_controlnet
from sim.engine.clientside import load_run_config
from sim.engine.context import context_for
from sim.engine.runner import checked_release
torch.set_num_threads(1)
out, n = sys.argv[1], int(sys.argv[2])
for run in sys.argv[3:]:
    cfg = load_run_config(run, [f"release-check={n}"])
    ctx = context_for(cfg)
    for scheme in cfg.schemes:
        t0 = time.time()
        row = {"run": run, "scheme": scheme, **checked_release(cfg, ctx, scheme, load_controlnet(f"{run}/controlnet_{scheme}")),
               "s": round(time.time() - t0)}
        print(row, flush=True)
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")

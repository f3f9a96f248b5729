"""Average the saved ControlNets of runs on one training trajectory (a crude checkpoint average).

    python average.py OUT TEMPLATE_RUN SCHEMES RUN [RUN ...]

OUT gets TEMPLATE_RUN's config.toml / clients.toml / complete.json (schemes set to SCHEMES,
comma-separated; baseline off) and, per scheme, the uniform average of the RUNs'
controlnet_<scheme> weights (a RUN may name its scheme as `{scheme}`, e.g.
results/privacy-frontier/{scheme}-none). Then `splitcontrol evaluate OUT --json` samples and scores it.
Run from the repository root. Runs of the same seed and recipe but different `steps` share
their trajectory (the batches, t and noise streams do not depend on the budget), so their
ControlNets are checkpoints of one training run.
"""
import json
import re
import shutil
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file

out, template, schemes, runs = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3].split(","), sys.argv[4:]
out.mkdir(parents=True, exist_ok=False)
for name in ("clients.toml", "complete.json"):
    shutil.copy(template / name, out / name)
cfg = (template / "config.toml").read_text()
cfg = re.sub(r"(?m)^schemes = .*$", "schemes = " + json.dumps(schemes), cfg)
cfg = re.sub(r"(?m)^baseline = .*$", "baseline = false", cfg)
(out / "config.toml").write_text(cfg)
WEIGHTS = "diffusion_pytorch_model.safetensors"
for s in schemes:
    dirs = [Path(r.format(scheme=s)) / f"controlnet_{s}" for r in runs]
    sds = [load_file(str(d / WEIGHTS)) for d in dirs]
    avg = {k: (sum(sd[k].float() for sd in sds) / len(sds)).to(sds[0][k].dtype) for k in sds[0]}
    shutil.copytree(dirs[0], out / f"controlnet_{s}")
    save_file(avg, str(out / f"controlnet_{s}" / WEIGHTS))
    print(f"controlnet_{s}: the average of {len(runs)} runs")

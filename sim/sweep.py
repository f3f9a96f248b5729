"""``splitcontrol sweep PRESET``: run named variants of one experiment and tabulate them.

A sweep preset (``baselines/*.toml``) is a TOML file::

    name = "defense-sweep"
    base = ["schemes=[\\"nograd\\"]", "steps=600"]   # overrides every variant shares
    smoke = ["steps=4", ...]                        # extra overrides for --smoke (CI)
    attacks = ["noise-target"]                      # run on every variant (optional)

    [[variant]]
    name = "none"
    set = []

    [[variant]]
    name = "symsigmoid"
    set = ["defenses=[\\"symsigmoid\\"]"]

Each variant is a ``compare`` run in ``OUT/<variant>/`` (skipped when its summary.json
exists, so an interrupted sweep resumes); ``OUT/sweep.json`` collects one row per
(variant, scheme) with the utility metrics, loss, bytes, wall time and, when attacks
ran, the best SSIM per attack; ``OUT/sweep.md`` is the same as a Markdown table.
"""
from __future__ import annotations

import json
import time
import tomllib
from pathlib import Path

from tqdm.auto import tqdm

from .config import load_config

ROW_KEYS = ("outline_iou", "edge_ssim", "colour_acc", "fid_project", "final_loss", "bytes_up_per_step",
            "bytes_down_per_step", "wall_s")


def load_sweep(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"sweep preset {path} not found (see baselines/*.toml)")
    spec = tomllib.loads(path.read_text())
    names = [v.get("name") for v in spec.get("variant", [])]
    if not names or None in names or len(set(names)) != len(names):
        raise ValueError(f"{path}: every [[variant]] needs a unique name; got {names}")
    return spec


def variant_config(spec: dict, variant: dict, smoke: bool = False):
    overrides = list(spec.get("base", [])) + list(variant.get("set", []))
    if spec.get("attacks"):
        overrides.append("attacks=" + json.dumps(spec["attacks"]))
    if smoke:
        overrides += list(spec.get("smoke", []))
    return load_config(spec.get("preset", "default"), overrides)


def run_sweep(preset: str | Path, out: str | Path, smoke: bool = False, only: list[str] | None = None) -> list[dict]:
    from .compare import run_compare

    spec = load_sweep(preset)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    variants = [v for v in spec["variant"] if not only or v["name"] in only]
    configs = {v["name"]: variant_config(spec, v, smoke) for v in variants}  # validate all before running any
    for v in tqdm(variants, desc=f"sweep {spec.get('name', Path(preset).stem)}", unit="variant"):
        run = out / v["name"]
        if (run / "summary.json").exists():
            continue
        t0 = time.time()
        run_compare(configs[v["name"]], run)
        print(f"variant {v['name']}: {time.time() - t0:.0f} s")
    rows = collect(out, [v["name"] for v in variants])
    (out / "sweep.json").write_text(json.dumps(rows, indent=1))
    (out / "sweep.md").write_text(markdown(rows) + "\n")
    print(markdown(rows))
    if any(k.startswith("attack:") for r in rows for k in r):
        from .plots import plot_privacy_utility

        for utility in ("outline_iou", "colour_acc"):
            print("figure:", plot_privacy_utility(out / "sweep.json", utility=utility))
    return rows


def collect(out: Path, names: list[str]) -> list[dict]:
    from attacks import best_ssim

    rows = []
    for name in names:
        path = out / name / "summary.json"
        if not path.exists():
            continue
        summary = json.loads(path.read_text())
        cfg = load_config(str(out / name / "config.toml"))
        base_iou = next((r.get("outline_iou") for r in summary["rows"] if r["scheme"].startswith("base")), None)
        for r in summary["rows"]:
            if r["scheme"].startswith("base"):
                continue
            row = {"variant": name, "scheme": r["scheme"], "defenses": list(cfg.defenses), "steps": r["steps"],
                   **{k: r.get(k) for k in ROW_KEYS}, "base_outline_iou": base_iou}
            for a in summary.get("attacks", {}).get(r["scheme"], []):
                row[f"attack:{a['attack']}"] = best_ssim(a) if a["status"] == "ok" else "N/A"
                if "prompt" in a:
                    row[f"attack:{a['attack']}"] = a["prompt"]["accuracy"]
            rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    from .compare import markdown_table

    attack_cols = sorted({k for r in rows for k in r if k.startswith("attack:")})
    cols = ["variant", "scheme", "outline_iou", "edge_ssim", "colour_acc", "fid_project", "final_loss",
            "bytes_up_per_step"] + attack_cols
    return markdown_table(rows, cols)

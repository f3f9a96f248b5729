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
    smoke = ["num-clients=2"]                       # optional: this variant's own, after the preset's
    engine = "ray"                                  # optional: "in-process" (default) or "ray" (below)

Each variant is a ``compare`` run in ``OUT/<variant>/`` (skipped when its summary.json
exists, so an interrupted sweep resumes); ``OUT/sweep.json`` collects one row per
(variant, scheme) with the utility metrics, loss, bytes, wall time and, when attacks
ran, the best SSIM per attack; ``OUT/sweep.md`` is the same as a Markdown table.

Runs are deterministic given their configuration (the ``jobs`` split aside), so a variant
whose configuration equals a finished run's in a sibling folder of ``OUT`` (another
preset's sweep under the same ``results/``) is copied from it instead of trained again;
attacks it lists that the copy lacks are then run on the copy. ``sweep.json`` names the
source in ``reused_from``. Pass ``reuse=False`` (CLI ``--no-reuse``) to train everything.

A variant with ``engine = "ray"`` runs under Flower's Ray simulation engine instead
(:func:`sim.engine.ray_sim.run_ray`: one virtual SuperNode per client; never copied from an
in-process run; no attacks, since the clients keep their own keys there).

When attacks ran on the circles, ``privacy_<utility>.png`` plots leakage against utility with
the Pareto front. Optional preset keys for figures and tables: ``x_label`` with a number
``x`` per variant (and an optional ``group``) draws ``sweep_utility.png`` and
``sweep_leakage.png`` curves against it;
``figures = ["schemes"]`` draws loss, bytes and client-cost figures across the variants;
``matrix = true`` writes ``matrix.md``, the variant x attack table with N/A reasons;
``frontier = true`` draws ``frontier_image.png`` and ``frontier_hint.png``: the strongest
attack's SSIM on each target against outline IoU, with error bars, the blind guess and the
Pareto front. Rows carry ``best_image`` / ``best_hint`` (and the attack that reached it) and
``blind_image`` / ``blind_hint``. :func:`redraw` draws the figures again from ``OUT/sweep.json``
alone (the per-variant figures and matrix.md, which need the run folders, are skipped without them).
"""
from __future__ import annotations

import json
import shutil
import time
import tomllib
from pathlib import Path

from tqdm.auto import tqdm

from attacks import best_ssim, make_attack
from sim.core import jsonio, plots
from sim.core.stats import paired_comparison
from sim.core.tables import markdown_table
from sim.engine.clientside import load_run_config
from sim.engine.context import load_experiment
from sim.engine.ray_sim import run_ray
from sim.engine.runfolder import INCOMPLETE, config_differences, is_complete
from sim.engine.runner import run_compare
from sim.engine.scoring import blind_scores, run_attacks

ROW_KEYS = ("outline_iou", "outline_iou_se", "edge_ssim", "edge_f1", "psnr", "ssim", "colour_acc", "colour_acc_se", "fid_project", "fid_inception", "clip_score", "final_loss",
            "bytes_up_per_step", "bytes_down_per_step", "wall_s", "epsilon", "delta")


ENGINES = ("in-process", "ray")


def load_sweep(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"sweep preset {path} not found (see baselines/*.toml)")
    spec = tomllib.loads(path.read_text())
    names = [v.get("name") for v in spec.get("variant", [])]
    if not names or None in names or len(set(names)) != len(names):
        raise ValueError(f"{path}: every [[variant]] needs a unique name; got {names}")
    for v in spec["variant"]:
        if v.get("engine", "in-process") not in ENGINES:
            raise ValueError(f"{path}: variant {v['name']!r}: engine={v['engine']!r}, expected one of {ENGINES}")
    return spec


def variant_config(spec: dict, variant: dict, smoke: bool = False):
    overrides = list(spec.get("base", [])) + list(variant.get("set", []))
    if spec.get("attacks"):
        overrides.append("attacks=" + json.dumps(spec["attacks"]))
    if smoke:
        overrides += list(spec.get("smoke", [])) + list(variant.get("smoke", []))
    return load_experiment(spec.get("preset", "default"), overrides)


def attack_ids(cfg) -> set[str]:
    """The attacks a configuration lists, as their rows name them (canonical ``name:k=v`` order)."""
    return {repr(make_attack(a)) for a in cfg.attacks}


def find_identical(cfg, root: Path, exclude: Path | None = None) -> Path | None:
    """A finished run folder under ``root/*/`` or ``root/*/*/`` trained with ``cfg``'s configuration."""
    for path in sorted(root.glob("*/config.toml")) + sorted(root.glob("*/*/config.toml")):
        run = path.parent
        if run == exclude or not is_complete(run) or (run / "reused_from").exists():
            continue
        if not config_differences(cfg, run):  # an unreadable (older or foreign) config differs too
            return run
    return None


def reuse_run(src: Path, dst: Path, cfg) -> None:
    """Copy the finished run ``src`` to ``dst`` as ``cfg``'s run; run the attacks of ``cfg`` it lacks."""
    shutil.copytree(src, dst, dirs_exist_ok=True)
    (dst / "config.toml").write_text(cfg.public().to_toml())  # clients.toml: the source's (the same keys)
    (dst / "reused_from").write_text(str(src.resolve()) + "\n")
    summary = jsonio.read(dst / "summary.json")
    summary["reused_from"] = str(src)
    (dst / "summary.json").write_text(jsonio.dumps(summary, indent=2))
    done = {r["attack"] for r in jsonio.read(dst / "attacks.json")} if (dst / "attacks.json").exists() else set()
    missing = [a for a in cfg.attacks if repr(make_attack(a)) not in done]
    if missing:
        run_attacks(dst, missing)


def run_sweep(preset: str | Path, out: str | Path, smoke: bool = False, only: list[str] | None = None,
              reuse: bool = True) -> list[dict]:
    spec = load_sweep(preset)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    known = [v["name"] for v in spec["variant"]]
    unknown = sorted(set(only or ()) - set(known))
    if unknown:
        raise ValueError(f"{preset}: no variant(s) {unknown}; its variants: {known}")
    variants = [v for v in spec["variant"] if not only or v["name"] in only]
    configs = {v["name"]: variant_config(spec, v, smoke) for v in variants}  # validate all before running any
    for v in tqdm(variants, desc=f"sweep {spec.get('name', Path(preset).stem)}", unit="variant"):
        run = out / v["name"]
        if is_complete(run):
            stale = config_differences(configs[v["name"]], run)
            if stale:
                print(f"warning: variant {v['name']} in {run} is kept from an earlier run whose configuration "
                      f"differs from the preset's in {stale}; delete the folder (or use another --out) to rerun it")
            continue
        t0 = time.time()
        ray = v.get("engine", "in-process") == "ray"
        src = find_identical(configs[v["name"]], out.resolve().parent, exclude=run.resolve()) \
            if reuse and not ray else None
        if src is not None:
            print(f"variant {v['name']}: same configuration as {src}, copied")
            reuse_run(src, run, configs[v["name"]])
        elif ray:
            run_ray(configs[v["name"]], run, resume=(run / INCOMPLETE).exists())
        else:  # an interrupted variant (killed in training or in its attacks) is finished, not skipped
            run_compare(configs[v["name"]], run, resume=(run / INCOMPLETE).exists())
        print(f"variant {v['name']}: {time.time() - t0:.0f} s")
    rows = collect(out, [v["name"] for v in variants], spec)
    (out / "sweep.json").write_text(jsonio.dumps(rows, indent=1))
    (out / "sweep.md").write_text(markdown(rows) + "\n")
    print(markdown(rows))
    figures(spec, out, rows, [v["name"] for v in variants])
    return rows


def _first_config(spec: dict, out: Path, rows: list[dict]):
    """The first row's variant's configuration: its run folder's, else the preset's (a sweep.json
    re-drawn without its run folders)."""
    name = rows[0]["variant"]
    if (out / name / "config.toml").exists():
        return load_run_config(out / name)
    variant = next((v for v in spec.get("variant", []) if v["name"] == name), None)
    if variant is None:
        raise ValueError(f"{out / 'sweep.json'}: variant {name!r} has no run folder and is not in the preset")
    return variant_config(spec, variant)


def _blind(spec: dict, out: Path, rows: list[dict], first) -> dict | None:
    """The SSIM of a guess made without any transcript, per target ({"image", "hint"}), when attacks
    ran: the rows' ``blind_image`` / ``blind_hint``, else computed on the first variant's data."""
    if not any(k.startswith("attack:") for r in rows for k in r):
        return None
    recorded = {t: r[f"blind_{t}"] for r in rows[:1] for t in ("image", "hint") if r.get(f"blind_{t}") is not None}
    return recorded or {k: v["ssim"] for k, v in blind_scores(first).items()}


def figures(spec: dict, out: Path, rows: list[dict], names: list[str]) -> list[Path]:
    """The figures and tables a preset asks for (see the module docstring); returns their paths.
    Drawn from ``rows`` (sweep.json); the per-variant figures and matrix.md need the run folders
    and are skipped (with a note) where none is there."""

    written = []
    first = _first_config(spec, out, rows) if rows else None
    blind = _blind(spec, out, rows, first) if rows else None
    if blind and first.dataset == "fill50k":  # (the utility metrics are the circles')
        written += [plots.plot_privacy_utility(out / "sweep.json", utility=u, blind=blind)
                    for u in ("outline_iou", "colour_acc")]
    if spec.get("frontier"):
        written += [plots.plot_frontier(out / "sweep.json", target, blind=blind) for target in ("image", "hint")]
    if spec.get("x_label"):
        written += plots.plot_sweep_curves(out / "sweep.json", spec["x_label"], blind)
    runs = [n for n in names if (out / n / "summary.json").exists()]
    if "schemes" in spec.get("figures", []):
        if runs:
            written += plots.plot_variants(out, names)
        else:
            print(f"skipped: loss, bytes and client-cost figures (no run folder of {names} under {out})")
    if spec.get("matrix"):
        if any((out / n / "attacks.json").exists() for n in names):
            (out / "matrix.md").write_text(matrix_markdown(out, names) + "\n")
            written.append(out / "matrix.md")
        else:
            print(f"skipped: matrix.md (no attacks.json under {out})")
    for p in written:
        print("figure:" if p.suffix == ".png" else "table:", p)
    return written


def redraw(preset: str | Path, out: str | Path) -> list[Path]:
    """Re-draw a finished sweep's figures from its ``OUT/sweep.json`` (no training, no attacks)."""
    out = Path(out)
    if not (out / "sweep.json").exists():
        raise FileNotFoundError(f"{out} has no sweep.json: run `splitcontrol sweep {preset} --out {out}` first")
    spec = load_sweep(preset)
    rows = jsonio.read(out / "sweep.json")
    return figures(spec, out, rows, list(dict.fromkeys(r["variant"] for r in rows)))


def collect(out: Path, names: list[str], spec: dict | None = None) -> list[dict]:
    extra = {v["name"]: {k: v[k] for k in ("x", "group", "engine") if k in v} for v in (spec or {}).get("variant", [])}
    rows, blinds = [], {}
    for name in names:
        path = out / name / "summary.json"
        if not path.exists():
            continue
        summary = jsonio.read(path)
        cfg = load_run_config(out / name)
        data_key = _data_key(cfg)
        wanted = attack_ids(cfg)
        base_iou = next((r.get("outline_iou") for r in summary["rows"] if r["scheme"].startswith("base")), None)
        for r in summary["rows"]:
            if r["scheme"].startswith("base"):
                continue
            row = {"variant": name, "scheme": r["scheme"], "defenses": list(cfg.defenses), "steps": r["steps"],
                   **{k: r.get(k) for k in ROW_KEYS}, "base_outline_iou": base_iou, **extra.get(name, {}),
                   "reused_from": summary.get("reused_from")}
            for a in summary.get("attacks", {}).get(r["scheme"], []):
                if a["attack"] not in wanted:  # a copied run's attacks of another preset
                    continue
                key = "attack:" + a["attack"].split(":")[0]  # the name: presets' smoke runs change parameters
                row[key] = best_ssim(a) if a["status"] == "ok" else "N/A"
                for target in ("image", "hint"):  # the parts of the best score, for the curves
                    if target in a:
                        row[f"{target}:{key[7:]}"] = a[target]["ssim"]
                        if a[target]["ssim"] > row.get(f"best_{target}", -1.0):  # the strongest attack per target
                            row.update({f"best_{target}": a[target]["ssim"], f"best_{target}_attack": key[7:],
                                        f"best_{target}_se": a[target].get("ssim_se")})
                if "prompt" in a:  # a prompt-only attack's score is its accuracy; others keep their SSIM
                    row["prompt:" + key[7:]] = a["prompt"]["accuracy"]
                    if "image" not in a and "hint" not in a:
                        row[key] = a["prompt"]["accuracy"]
            if any(k.startswith("attack:") for k in row):  # what a guess without any transcript scores
                if data_key not in blinds:
                    blinds[data_key] = blind_scores(cfg)
                row.update({f"blind_{t}": s["ssim"] for t, s in blinds[data_key].items()})
            rows.append(row)
    paired_with_reference(out, rows)
    return rows


def paired_with_reference(out: Path, rows: list[dict]) -> None:
    """Each row against its scheme's first variant in the sweep (the reference, usually "none"),
    condition by condition (:func:`sim.core.stats.paired_comparison`: the variants share the eval
    conditions and sampling noise): ``ref_variant`` and, per metric, ``<metric>_vs_ref`` (the mean
    difference), ``_se``, ``_p`` and ``_resolved``. Runs without per_condition.json (older) are skipped."""
    per: dict[str, dict] = {}
    for row in rows:
        path = out / row["variant"] / "per_condition.json"
        if row["variant"] not in per:
            per[row["variant"]] = jsonio.read(path) if path.exists() else {}
    refs: dict[str, str] = {}
    for row in rows:
        mine = per[row["variant"]].get(row["scheme"])
        if mine is None:
            continue
        ref = refs.setdefault(row["scheme"], row["variant"])
        theirs = per[ref].get(row["scheme"], {})
        if ref == row["variant"]:
            continue
        for metric, values in mine.items():
            if len(theirs.get(metric, ())) != len(values) or len(values) < 2:
                continue
            c = paired_comparison(values, theirs[metric])
            row["ref_variant"] = ref
            row.update({f"{metric}_vs_ref": c["diff"], f"{metric}_vs_ref_se": c["diff_se"],
                        f"{metric}_vs_ref_p": c["p"], f"{metric}_vs_ref_resolved": c["resolved"]})


def _data_key(cfg) -> tuple:
    """What decides the data a blind guess is scored on: variants sharing it share the blind scores."""
    return (cfg.dataset, cfg.model, cfg.resolution, cfg.num_samples, cfg.eval_samples, cfg.eval_seed, cfg.data_seed,
            cfg.max_radius, cfg.image_column, cfg.conditioning_image_column, cfg.caption_column)


def markdown(rows: list[dict]) -> str:
    """The sweep's table: utility, cost and, when attacks ran, the strongest attack on each target
    (image and hint SSIM, prompt accuracy, each with the attack that reached it), the blind guess and
    the accounted (epsilon, delta); the per-attack scores are in sweep.json (and matrix.md)."""
    attacked = any(k.startswith("attack:") for r in rows for k in r)
    paired = any("outline_iou_vs_ref" in r for r in rows)
    cols = ["variant", "scheme", "outline_iou", "outline_iou_se"] + (["IoU vs ref (paired)"] if paired else []) + [
        "edge_ssim", "colour_acc", "fid_project", "final_loss", "bytes_up_per_step"]
    if attacked:
        cols += ["epsilon", "delta", "best image", "best hint", "best prompt", "blind image / hint"]
    return markdown_table([{**r, "IoU vs ref (paired)": _vs_ref_cell(r), **(_best_cells(r) if attacked else {})}
                           for r in rows], cols)


def _best_cells(row: dict) -> dict:
    """A row's strongest attack per target as 'SSIM (attack)' (prompt: accuracy), 'N/A' where no attack
    reconstructs that target; and the blind guess's 'image / hint' SSIM."""
    cells = {f"best {t}": (f"{row[f'best_{t}']:.2f} ({row[f'best_{t}_attack']})" if f"best_{t}" in row else "N/A")
             for t in ("image", "hint")}
    prompts = {k[len("prompt:"):]: v for k, v in row.items() if k.startswith("prompt:")}
    best = max(prompts, key=prompts.get) if prompts else None
    cells["best prompt"] = f"{prompts[best]:.2f} ({best})" if best else "N/A"
    cells.update({k: "-" for k in ("epsilon", "delta") if row.get(k) is None})  # no accounted defense
    if row.get("epsilon") is None and row.get("delta") is not None:  # accounted, with no finite bound (> 1e6)
        cells["epsilon"] = "inf"
    blind = [row.get(f"blind_{t}") for t in ("image", "hint")]
    cells["blind image / hint"] = " / ".join("-" if b is None else f"{b:.2f}" for b in blind)
    return cells


def _vs_ref_cell(row: dict) -> str:
    """'+0.031 ± 0.020 vs none (p 0.12)': a row's outline IoU minus its reference variant's, paired."""
    if "outline_iou_vs_ref" not in row:
        return ""
    mark = ", resolved" if row["outline_iou_vs_ref_resolved"] else ""
    return (f"{row['outline_iou_vs_ref']:+.3f} ± {row['outline_iou_vs_ref_se']:.3f} vs {row['ref_variant']} "
            f"(p {row['outline_iou_vs_ref_p']:.2g}{mark})")


def _ssim_cell(row: dict) -> str:
    """'image / hint' mean SSIM of an attack row (a dash for a target it does not reconstruct)."""
    return " / ".join(f"{row[k]['ssim']:.2f}" if k in row else "-" for k in ("image", "hint"))


def matrix_markdown(out: Path, names: list[str]) -> str:
    """Variant x attack table from each run's attacks.json: mean SSIM of the reconstructed private
    images / hints (prompt inference: accuracy, with chance), or N/A with a numbered reason below the
    table; the ``blind`` column is what a guess without any transcript scores on the same data."""
    rows, reasons, attacks, blind = [], [], [], {}
    for name in names:
        path = out / name / "attacks.json"
        if not path.exists():
            continue
        cfg = load_run_config(out / name)
        wanted = attack_ids(cfg)
        data_key = _data_key(cfg)
        if data_key not in blind:
            blind[data_key] = _ssim_cell(blind_scores(cfg))
        by_scheme: dict[str, dict] = {}
        bests: dict[str, dict] = {}
        for a in jsonio.read(path):
            if a["attack"] not in wanted:  # a copied run's attacks of another preset
                continue
            a = {**a, "attack": a["attack"].split(":")[0]}
            if a["attack"] not in attacks:
                attacks.append(a["attack"])
            if a["status"] != "ok":
                if a["reason"] not in reasons:
                    reasons.append(a["reason"])
                cell = f"N/A ({reasons.index(a['reason']) + 1})"
            else:
                cell = _ssim_cell(a) if ("image" in a or "hint" in a) else ""
                best = bests.setdefault(a["scheme"], {})
                for target in ("image", "hint"):
                    if target in a and a[target]["ssim"] > best.get(target, (-1.0, ""))[0]:
                        best[target] = (a[target]["ssim"], a["attack"])
                if "prompt" in a:
                    acc = f"prompt {a['prompt']['accuracy']:.2f} (chance {a['prompt']['chance']:.2f})"
                    cell = f"{cell}; {acc}" if cell else acc
            by_scheme.setdefault(a["scheme"], {})[a["attack"]] = cell
        for scheme, cells in by_scheme.items():
            best = {f"best {t}": f"{v[0]:.2f} ({v[1]})" for t, v in bests.get(scheme, {}).items()}
            rows.append({"variant": name, "scheme": scheme, "defenses": ", ".join(cfg.defenses) or "none",
                         "blind": blind[data_key], **best, **cells})
    table = markdown_table(rows, ["variant", "scheme", "defenses", "blind", "best image", "best hint"] + attacks)
    notes = "\n".join(f"({i + 1}) {r}" for i, r in enumerate(reasons))
    return ("Cells: mean SSIM of reconstructed private images / hints (higher = more leaked); blind = the "
            "better of two guesses made without any transcript; best image / best hint = the strongest attack "
            "on each target.\n\n" + table
            + ("\n\nN/A reasons:\n" + notes if notes else ""))

"""What each ``splitcontrol`` sub-command does (the parser is :mod:`sim.commands.cli`).

One function per sub-command, ``cmd_<name>(args) -> exit code``; imported only when a
sub-command runs, so ``splitcontrol --help`` and bad arguments answer at once.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import datasets

from attacks import list_attacks
from defenses import BUNDLES, list_defenses, make_defense
from defenses.timestep_target import epsilon_at, t_start_for
from sim.commands import timeline as tl
from sim.commands.bench import bench, sampling_bench
from sim.commands.cost import cost_table, markdown
from sim.commands.feature_net import run as run_feature_net
from sim.commands.pretrain import PretrainConfig, eval_base, pretrain_base
from sim.commands.sweep import load_sweep, run_sweep
from sim.core.models import ddpm_scheduler, get_preset
from sim.core.plots import plot_run
from sim.core.tables import print_table
from sim.engine.context import load_experiment
from sim.engine.flower_run import flwr_run
from sim.engine.privacy import planned_record_sends
from sim.engine.ray_sim import run_ray
from sim.engine.runfolder import require_complete
from sim.engine.runner import reevaluate, run_compare
from sim.engine.scoring import run_attacks
from strategies import SCHEMES


def setup_env() -> None:
    datasets.disable_progress_bars()  # our own progress bars cover the long loops (sim/__init__: offline)


def cmd_pretrain(a: argparse.Namespace) -> int:
    cfg = PretrainConfig(out=a.out, steps=a.steps, minutes=a.minutes, batch_size=a.batch_size, lr=a.lr,
                         seed=a.seed, threads=a.threads, num_samples=a.num_samples)
    print(json.dumps(pretrain_base(cfg)))
    return 0


def cmd_feature_net(a: argparse.Namespace) -> int:
    return run_feature_net(a)


def cmd_eval_base(a: argparse.Namespace) -> int:
    res = eval_base(folder=a.model, n=a.n, steps=a.steps, guidance=a.guidance, seed=a.seed, save_grid=a.grid)
    if a.json:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            print(f"{k:>18}: {v}")
    return 0


def cmd_compare(a: argparse.Namespace) -> int:
    cfg = load_experiment(a.preset, a.set or [])
    out = Path(a.out) if a.out else Path("results") / cfg.experiment / time.strftime("%Y%m%d-%H%M%S")
    summary = run_compare(cfg, out, overwrite=a.overwrite, resume=a.resume)
    figures = plot_run(out)
    print("figures: " + ", ".join(str(p) for p in figures))
    if a.json:
        print(json.dumps(summary))
    return 0


def cmd_flower_sim(a: argparse.Namespace) -> int:
    cfg = load_experiment(a.preset, a.set or [])
    out = Path(a.out) if a.out else Path("results") / cfg.experiment / time.strftime("flower-%Y%m%d-%H%M%S")
    if a.cpus_per_client < 1:
        raise ValueError(f"--cpus-per-client must be >= 1, got {a.cpus_per_client}")
    run_ray(cfg, out.resolve(), cpus_per_client=a.cpus_per_client, resume=a.resume)
    print(f"wrote {out.resolve()} (summary.json, figures)")
    return 0


def cmd_flwr_run(a: argparse.Namespace) -> int:
    if not a.flwr_args:
        raise ValueError("give flwr run's arguments, e.g. splitcontrol flwr-run . local-sim --stream")
    return flwr_run(a.flwr_args)


def cmd_plot(a: argparse.Namespace) -> int:
    require_complete(Path(a.run_dir), "plot")
    for p in plot_run(a.run_dir):
        print(p)
    return 0


def cmd_evaluate(a: argparse.Namespace) -> int:
    rows = reevaluate(a.run_dir, a.set or [], update=a.update)
    if a.json:
        print(json.dumps(rows))
    else:
        print_table(rows, ["scheme", "outline_iou", "outline_iou_se", "edge_ssim", "fg_colour_acc", "bg_colour_acc", "colour_acc",
                           "colour_acc_se", "fid_project"])
    return 0


def cmd_bench(a: argparse.Namespace) -> int:
    if a.sampling:
        res = sampling_bench(load_experiment(a.preset, a.set or []), steps=a.steps, repeats=a.repeats)
        print(json.dumps(res, indent=None if a.json else 2))
        return 0
    overrides = [f"steps={a.steps}"] + (a.set or [])
    res = bench(load_experiment(a.preset, overrides), repeats=a.repeats, progress=not a.json)
    print(json.dumps(res, indent=None if a.json else 2))
    return 0


def cmd_defenses(a: argparse.Namespace) -> int:
    preset = get_preset(a.model).at_resolution(a.resolution)
    sched = ddpm_scheduler(preset)
    dim = preset.latent_channels * preset.latent_size ** 2
    sens = 2.0 * dim ** 0.5
    table = []
    for eps in (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024):
        try:
            t0 = t_start_for(sched, eps, a.delta, sens)
            table.append({"epsilon": eps, "delta": a.delta, "t_start": t0,
                          "abar_t_start": float(sched.alphas_cumprod[t0]),
                          "epsilon_at_t_start": epsilon_at(float(sched.alphas_cumprod[t0]), sens, a.delta)})
        except ValueError:
            table.append({"epsilon": eps, "delta": a.delta, "t_start": None})
    res = {"defenses": list_defenses(sched, SCHEMES.values(), dim), "bundles": {k: list(v) for k, v in BUNDLES.items()},
           "latent_shape": [preset.latent_channels, preset.latent_size, preset.latent_size],
           "timestep_table": {"model": a.model, "sensitivity": sens, "assumes": "eps secret; latents in [-1, 1]",
                              "rows": table}}
    releases = a.releases
    if a.preset:
        releases = planned_record_sends(load_experiment(a.preset, a.set or []))
    if releases:
        res["per_run"] = {"record_sends": releases, "preset": a.preset,
                          "rows": [{"name": d["name"], "releases_per": d["releases_per"],
                                    "epsilon_per_release": d["guarantee_1"], "epsilon_per_run": d["guarantee_n"]}
                                   for d in per_run_rows(sched, dim, releases)]}
    if a.json:
        print(json.dumps(res, indent=1))
        return 0
    for d in res["defenses"]:
        print(f"{d['name']:<16} hooks={','.join(d['hooks']):<18} schemes={','.join(d['schemes']):<22} "
              f"params={d['params']}\n{'':16} {d['summary']}")
    for k, v in res["bundles"].items():
        print(f"bundle {k}: {v}")
    print(f"\nt_start from a privacy target (model {a.model} at {preset.image_size} px, forward noise as the mechanism, eps secret, "
          f"delta={a.delta}, sensitivity {sens:.1f}):")
    print("  epsilon  t_start  abar_t_start")
    for r in table:
        print(f"  {r['epsilon']:>7}  {str(r['t_start']):>7}  " +
              (f"{r['abar_t_start']:.3g}" if r["t_start"] is not None else "unreachable"))
    if "per_run" in res:
        pr = res["per_run"]
        print(f"\nper-run guarantee of the accounted defenses (defaults, delta as set per defense) for a record sent "
              f"{pr['record_sends']} times" + (f" (the most-sent record of preset {pr['preset']!r})" if pr["preset"]
                                               else "") + " (the split schemes' accounted defenses):")
        for r in pr["rows"]:
            print(f"  {r['name']:<16} per release {r['epsilon_per_release']:.4g}  per run {r['epsilon_per_run']:.4g}")
    return 0


def per_run_rows(sched, dim: int, releases: int) -> list[dict]:
    """Every accounted defense of the split schemes at its defaults: epsilon for one release of a record and
    for ``releases`` of it."""
    rows = []
    for d in list_defenses():
        defense = make_defense(d["name"])
        if not d["accounted"] or defense.releases_per != "record":  # FedAvg's count client steps or rounds
            continue
        defense.bind(dim)
        rows.append({"name": d["name"], "releases_per": defense.releases_per,
                     "guarantee_1": defense.guarantee(sched, 1)["epsilon"],
                     "guarantee_n": defense.guarantee(sched, releases)["epsilon"]})
    return rows


def cmd_attacks(a: argparse.Namespace) -> int:
    rows = list_attacks()
    if a.json:
        print(json.dumps(rows, indent=1))
    else:
        for r in rows:
            print(f"{r['name']:<18} schemes={','.join(r['schemes']):<22} needs={','.join(r['needs'])}\n"
                  f"{'':18} {r['summary']}")
    return 0


def cmd_attack(a: argparse.Namespace) -> int:
    require_complete(Path(a.run), "attack")
    rows = run_attacks(a.run, a.attack, a.scheme or None)
    if a.json:
        print(json.dumps(rows))
    return 0


def cmd_sweep(a: argparse.Namespace) -> int:
    name = load_sweep(a.preset).get("name", Path(a.preset).stem)
    out = a.out or str(Path("results") / (name + ("-smoke" if a.smoke else "")))
    rows = run_sweep(a.preset, out, smoke=a.smoke, only=a.only, reuse=not a.no_reuse)
    if a.json:
        print(json.dumps(rows))
    return 0


def cmd_cost(a: argparse.Namespace) -> int:
    table = cost_table(a.preset)
    print(json.dumps(table, indent=1) if a.json else markdown(table))
    return 0


def cmd_timeline(a: argparse.Namespace) -> int:
    if a.profiles:
        for kind, table in tl.load_profiles().items():
            for name, p in table.items():
                print(f"{kind:>7} {name:<11} {p['description']}\n{'':20}source: {p['source']}")
        return 0
    if a.validate:
        res = tl.validate(a.validate)
        for r in res["rows"]:
            print(f"{r['scheme']:>9}: predicted {r['predicted_wall_s']:.1f} s, measured {r['measured_wall_s']:.1f} s, "
                  f"error {r['relative_error']:.3f}")
        print(f"max relative error {res['max_relative_error']:.3f} (goal <= {res['goal']}); "
              f"wrote {Path(a.validate) / 'validation.json'}")
        return 0
    table = cost_table(a.preset)
    res = tl.timeline(a.preset, a.clients, a.client_device, a.server_device, a.network, a.samples, a.batch_size,
                      a.local_steps, a.wire, a.utilisation, table=table)
    if a.figure:
        path, data = tl.figure(a.figure, table)
        res["figure"] = {"path": str(path), **data}
    print(json.dumps(res, indent=1) if a.json else tl.markdown(res))
    return 0

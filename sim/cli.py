"""The ``splitcontrol`` command line.

Sub-commands
------------
compare        train a ControlNet under each scheme on the same data, seed and budget
run            run a preset's experiment (today: a comparison) with --set overrides
plot           draw a results folder's figures from its files
evaluate       sample and score a finished run's ControlNets again (other guidance, ...)
bench          Flower engine overhead: the apps on the in-process grid vs a bare PyTorch loop
pretrain-base  train the tiny frozen base model (text -> image) on Fill50K-style data
eval-base      generate images with the base model and measure prompt-colour accuracy
defenses       list the defenses (hook points, schemes, parameters, accounting)
attacks        list the attacks (threat model: what each needs, where it applies)
attack         run attacks on a finished run's kept round trips and score them
sweep          run a baselines/*.toml preset's variants and tabulate utility, cost and leakage
cost           parameters, FLOPs, memory and bytes per scheme at SD1.5 scale, without the hardware
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def _setup_env() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import datasets

    datasets.disable_progress_bars()  # our own progress bars cover the long loops


def _cmd_pretrain(a: argparse.Namespace) -> int:
    from .pretrain import PretrainConfig, pretrain_base

    cfg = PretrainConfig(out=a.out, steps=a.steps, minutes=a.minutes, batch_size=a.batch_size, lr=a.lr,
                         seed=a.seed, threads=a.threads, num_samples=a.num_samples)
    print(json.dumps(pretrain_base(cfg)))
    return 0


def _cmd_eval_base(a: argparse.Namespace) -> int:
    from .pretrain import eval_base

    res = eval_base(folder=a.model, n=a.n, steps=a.steps, guidance=a.guidance, seed=a.seed, save_grid=a.grid)
    if a.json:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            print(f"{k:>18}: {v}")
    return 0


def _cmd_compare(a: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from .compare import run_compare
    from .config import load_config
    from .plots import plot_run

    cfg = load_config(a.preset, a.set or [])
    out = Path(a.out) if a.out else Path("results") / cfg.experiment / time.strftime("%Y%m%d-%H%M%S")
    summary = run_compare(cfg, out)
    figures = plot_run(out)
    print("figures: " + ", ".join(str(p) for p in figures))
    if a.json:
        print(json.dumps(summary))
    return 0


def _cmd_plot(a: argparse.Namespace) -> int:
    from .plots import plot_run

    for p in plot_run(a.run_dir):
        print(p)
    return 0


def _cmd_evaluate(a: argparse.Namespace) -> int:
    from .compare import print_table, reevaluate

    rows = reevaluate(a.run_dir, a.set or [], update=a.update)
    if a.json:
        print(json.dumps(rows))
    else:
        print_table(rows, ["scheme", "outline_iou", "outline_iou_se", "edge_ssim", "fg_colour_acc", "bg_colour_acc", "colour_acc",
                           "fid_project"])
    return 0


def _cmd_bench(a: argparse.Namespace) -> int:
    from .bench import bench
    from .config import load_config

    overrides = [f"steps={a.steps}"] + (a.set or [])
    res = bench(load_config(a.preset, overrides), repeats=a.repeats, progress=not a.json)
    print(json.dumps(res, indent=None if a.json else 2))
    return 0


def _cmd_defenses(a: argparse.Namespace) -> int:
    from defenses import BUNDLES, list_defenses
    from defenses.timestep_target import epsilon_at, t_start_for

    from .models import ddpm_scheduler, get_preset

    preset = get_preset(a.model)
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
    res = {"defenses": list_defenses(sched), "bundles": {k: list(v) for k, v in BUNDLES.items()},
           "timestep_table": {"model": a.model, "sensitivity": sens, "assumes": "eps secret; latents in [-1, 1]",
                              "rows": table}}
    if a.json:
        print(json.dumps(res, indent=1))
        return 0
    for d in res["defenses"]:
        print(f"{d['name']:<16} hooks={','.join(d['hooks']):<18} schemes={','.join(d['schemes']):<22} "
              f"params={d['params']}\n{'':16} {d['summary']}")
    for k, v in res["bundles"].items():
        print(f"bundle {k}: {v}")
    print(f"\nt_start from a privacy target (model {a.model}, forward noise as the mechanism, eps secret, "
          f"delta={a.delta}, sensitivity {sens:.1f}):")
    print("  epsilon  t_start  abar_t_start")
    for r in table:
        print(f"  {r['epsilon']:>7}  {str(r['t_start']):>7}  " +
              (f"{r['abar_t_start']:.3g}" if r["t_start"] is not None else "unreachable"))
    return 0


def _cmd_attacks(a: argparse.Namespace) -> int:
    from attacks import list_attacks

    rows = list_attacks()
    if a.json:
        print(json.dumps(rows, indent=1))
    else:
        for r in rows:
            print(f"{r['name']:<18} schemes={','.join(r['schemes']):<22} needs={','.join(r['needs'])}\n"
                  f"{'':18} {r['summary']}")
    return 0


def _cmd_attack(a: argparse.Namespace) -> int:
    from attacks import run_attacks

    rows = run_attacks(a.run, a.attack, a.scheme or None)
    if a.json:
        print(json.dumps(rows))
    return 0


def _cmd_sweep(a: argparse.Namespace) -> int:
    from pathlib import Path

    from .sweep import load_sweep, run_sweep

    name = load_sweep(a.preset).get("name", Path(a.preset).stem)
    out = a.out or str(Path("results") / (name + ("-smoke" if a.smoke else "")))
    rows = run_sweep(a.preset, out, smoke=a.smoke, only=a.only, reuse=not a.no_reuse)
    if a.json:
        print(json.dumps(rows))
    return 0


def _cmd_cost(a: argparse.Namespace) -> int:
    from .cost import cost_table, markdown

    table = cost_table(a.preset)
    print(json.dumps(table, indent=1) if a.json else markdown(table))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="splitcontrol", description="Split learning vs federated learning of ControlNet: cost, utility, leakage.",
                                 epilog=__doc__.split("------------", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)

    for name, help_ in (("compare", "train under fedavg, vanilla and nograd side by side"),
                        ("run", "run a preset's experiment with overrides")):
        c = sub.add_parser(name, help=help_)
        c.add_argument("--preset", default="default", help="experiment preset (default, smoke) or a .toml path")
        c.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
        c.add_argument("--out", default=None, help="output directory (default: results/<experiment>/<date-time>)")
        c.add_argument("--json", action="store_true", help="print summary.json to stdout")
        c.set_defaults(func=_cmd_compare)

    pl = sub.add_parser("plot", help="draw loss, bytes, client cost and sample figures of a results folder")
    pl.add_argument("run_dir", help="a results folder (has summary.json)")
    pl.set_defaults(func=_cmd_plot)

    ev = sub.add_parser("evaluate", help="sample and score a finished run's saved ControlNets again")
    ev.add_argument("run_dir", help="a results folder with config.toml and controlnet_<scheme>/")
    ev.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="override an evaluation key: guidance, uncond-control, ddim-steps, eval-samples, seed")
    ev.add_argument("--json", action="store_true", help="print the rows as JSON")
    ev.add_argument("--update", action="store_true", help="write the new metrics into the run's summary.json")
    ev.set_defaults(func=_cmd_evaluate)

    b = sub.add_parser("bench", help="Flower apps on the in-process grid vs a bare PyTorch loop, per scheme")
    b.add_argument("--preset", default="default")
    b.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    b.add_argument("--steps", type=int, default=40, help="training steps per scheme and path")
    b.add_argument("--repeats", type=int, default=3, help="alternating runs per path; the best is kept")
    b.add_argument("--json", action="store_true", help="print only the JSON result")
    b.set_defaults(func=_cmd_bench)

    d = sub.add_parser("defenses", help="list the defenses and the t_start-vs-epsilon table")
    d.add_argument("--model", default="tiny", help="model preset whose noise schedule the table uses")
    d.add_argument("--delta", type=float, default=1e-5)
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=_cmd_defenses)

    al = sub.add_parser("attacks", help="list the attacks with their threat models")
    al.add_argument("--json", action="store_true")
    al.set_defaults(func=_cmd_attacks)

    at = sub.add_parser("attack", help="run attacks on a finished run (needs keep-messages > 0)")
    at.add_argument("--run", required=True, help="a results folder with seen_<scheme>.pt")
    at.add_argument("--attack", action="append", required=True, metavar="SPEC",
                    help="attack name or spec, e.g. noise-target or inverse-net:steps=300 (repeatable)")
    at.add_argument("--scheme", action="append", help="only these schemes (repeatable; default: all of the run)")
    at.add_argument("--json", action="store_true")
    at.set_defaults(func=_cmd_attack)

    sw = sub.add_parser("sweep", help="run a sweep preset (baselines/*.toml): one compare run per variant")
    sw.add_argument("preset", help="a sweep TOML, e.g. baselines/defense-sweep.toml")
    sw.add_argument("--out", default=None, help="output folder (default results/<name>[-smoke])")
    sw.add_argument("--smoke", action="store_true", help="apply the preset's smoke overrides (CI-sized)")
    sw.add_argument("--only", action="append", metavar="VARIANT", help="run only these variants (repeatable)")
    sw.add_argument("--no-reuse", action="store_true",
                    help="train every variant, even one whose configuration matches a finished run in a sibling folder")
    sw.add_argument("--json", action="store_true")
    sw.set_defaults(func=_cmd_sweep)

    co = sub.add_parser("cost", help="per-scheme parameters, FLOPs, memory and bytes at a preset's scale")
    co.add_argument("--preset", default="sd15", help="model preset (sd15, tiny)")
    co.add_argument("--json", action="store_true")
    co.set_defaults(func=_cmd_cost)

    p = sub.add_parser("pretrain-base", help="train the tiny base diffusion model")
    p.add_argument("--out", required=True, help="output folder (diffusers format + logs)")
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--minutes", type=float, default=None, help="stop after this wall time")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--num-samples", type=int, default=20000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(func=_cmd_pretrain)

    e = sub.add_parser("eval-base", help="measure the base model's prompt-colour accuracy")
    e.add_argument("--model", default=None, help="base model folder (default: the committed one)")
    e.add_argument("--n", type=int, default=64)
    e.add_argument("--steps", type=int, default=25, help="DDIM steps")
    e.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--grid", default=None, help="save a PNG grid of the samples here")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=_cmd_eval_base)
    return ap


def main(argv: list[str] | None = None) -> int:
    _setup_env()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:  # bad input: say what, no traceback
        if os.environ.get("SPLITCONTROL_DEBUG"):
            raise
        parser.exit(2, f"splitcontrol {args.command}: error: {e}\n")


if __name__ == "__main__":
    sys.exit(main())

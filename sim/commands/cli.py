"""The ``splitcontrol`` command line.

Sub-commands
------------
compare        train a ControlNet under each scheme on the same data, seed and budget
flower-sim     the same under Flower's Ray simulation engine (N virtual SuperNodes)
flwr-run       `flwr run` with the project's federations, an absolute out, nothing left running
run            run a preset's experiment (today: a comparison) with --set overrides
plot           draw a results folder's figures from its files
evaluate       sample and score a finished run's ControlNets again (other guidance, ...)
bench          Flower engine overhead: the apps on the in-process grid vs a bare PyTorch loop
pretrain-base  train the tiny frozen base model (text -> image) on Fill50K-style data
eval-base      generate images with the base model and measure prompt-colour accuracy
feature-net    train the feature network of FID (project features), also on a local dataset
defenses       list the defenses (hook points, schemes, parameters, accounting)
attacks        list the attacks (threat model: what each needs, where it applies)
attack         run attacks on a finished run's kept round trips and score them
sweep          run a baselines/*.toml preset's variants and tabulate utility, cost and leakage
cost           parameters, FLOPs, memory and bytes per scheme at SD1.5 scale, without the hardware
timeline       wall-clock per epoch per scheme for N clients on device and network profiles
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# the presets shipped in sim/presets/ (globbed, not imported: the CLI starts without torch)
PRESETS = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "presets").glob("*.toml"))
PRESET_HELP = f"experiment preset ({', '.join(PRESETS)}) or a .toml path"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="splitcontrol", description="Split learning vs federated learning of ControlNet: cost, utility, leakage.",
                                 epilog=__doc__.split("------------", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)

    for name, help_ in (("compare", "train under every scheme of the config side by side"),
                        ("run", "run a preset's experiment with overrides")):
        c = sub.add_parser(name, help=help_)
        c.add_argument("--preset", default="default", help=PRESET_HELP)
        c.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
        c.add_argument("--out", default=None, help="output directory (default: results/<experiment>/<date-time>)")
        c.add_argument("--json", action="store_true", help="print summary.json to stdout")
        again = c.add_mutually_exclusive_group()
        again.add_argument("--resume", action="store_true",
                           help="finish an interrupted run in --out (same configuration): redo what is missing")
        again.add_argument("--overwrite", action="store_true",
                           help="empty --out's run folder first (it holds a finished run or another configuration)")
        c.set_defaults(func="compare")

    fs = sub.add_parser("flower-sim", help="the same comparison under Flower's Ray simulation engine: one virtual "
                                           "SuperNode per client, nothing to configure")
    fs.add_argument("--preset", default="default", help=PRESET_HELP)
    fs.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    fs.add_argument("--out", default=None, help="output directory (default: results/<experiment>/flower-<date-time>)")
    fs.add_argument("--cpus-per-client", type=int, default=1, help="CPUs Ray reserves per virtual client")
    fs.add_argument("--resume", action="store_true", help="finish an interrupted run in --out")
    fs.set_defaults(func="flower_sim")

    fr = sub.add_parser("flwr-run", help="`flwr run ARGS` with the project's FLWR_HOME, an absolute out, and every "
                                         "process it started stopped at the end")
    fr.add_argument("flwr_args", nargs=argparse.REMAINDER, metavar="ARGS",
                    help="flwr run's arguments, e.g. . local-sim --run-config 'steps=8' --stream")
    fr.set_defaults(func="flwr_run")

    pl = sub.add_parser("plot", help="draw loss, bytes, client cost and sample figures of a results folder")
    pl.add_argument("run_dir", help="a results folder (has summary.json)")
    pl.set_defaults(func="plot")

    ev = sub.add_parser("evaluate", help="sample and score a finished run's saved ControlNets again")
    ev.add_argument("run_dir", help="a results folder with config.toml and controlnet_<scheme>/")
    ev.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="override an evaluation key: guidance, control-guidance, control-from, control-boost, "
                         "control-boost-above, uncond-control, release-check, "
                         "ddim-steps, eval-samples, seed, feature-net")
    ev.add_argument("--json", action="store_true", help="print the rows as JSON")
    ev.add_argument("--update", action="store_true", help="write the new metrics into the run's summary.json")
    ev.set_defaults(func="evaluate")

    b = sub.add_parser("bench", help="Flower apps on the in-process grid vs a bare PyTorch loop, per scheme")
    b.add_argument("--preset", default="default")
    b.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    b.add_argument("--steps", type=int, default=40, help="training steps per scheme and path (--sampling: DDIM steps)")
    b.add_argument("--repeats", type=int, default=3, help="alternating runs per path; the best is kept")
    b.add_argument("--json", action="store_true", help="print only the JSON result")
    b.add_argument("--sampling", action="store_true",
                   help="instead: sampling time of the eval conditions per guidance layout (--steps DDIM steps)")
    b.set_defaults(func="bench")

    d = sub.add_parser("defenses", help="list the defenses and the t_start-vs-epsilon table")
    d.add_argument("--model", default="tiny", help="model preset whose noise schedule and latent size the listing uses")
    d.add_argument("--resolution", type=int, default=0,
                   help="image side in px the latent size is taken at (0 = the model's own: tiny 32, sd15 512)")
    d.add_argument("--delta", type=float, default=1e-5)
    d.add_argument("--preset", help="also print each accounted defense's per-run epsilon for this preset's run "
                                    "(its most-sent record, counted by replaying the batch streams)")
    d.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a key of --preset (repeatable)")
    d.add_argument("--releases", type=int, help="per-run epsilon for a record sent this many times")
    d.add_argument("--json", action="store_true")
    d.set_defaults(func="defenses")

    al = sub.add_parser("attacks", help="list the attacks with their threat models")
    al.add_argument("--json", action="store_true")
    al.set_defaults(func="attacks")

    at = sub.add_parser("attack", help="run attacks on a finished run (needs keep-messages > 0)")
    at.add_argument("--run", required=True, help="a results folder with seen_<scheme>.pt")
    at.add_argument("--attack", action="append", required=True, metavar="SPEC",
                    help="attack name or spec, e.g. noise-target or inverse-net:steps=300 (repeatable)")
    at.add_argument("--scheme", action="append", help="only these schemes (repeatable; default: all of the run)")
    at.add_argument("--json", action="store_true")
    at.set_defaults(func="attack")

    sw = sub.add_parser("sweep", help="run a sweep preset (baselines/*.toml): one compare run per variant")
    sw.add_argument("preset", help="a sweep TOML, e.g. baselines/defense-sweep.toml")
    sw.add_argument("--out", default=None, help="output folder (default results/<name>[-smoke])")
    sw.add_argument("--smoke", action="store_true", help="apply the preset's smoke overrides (CI-sized)")
    sw.add_argument("--only", action="append", metavar="VARIANT", help="run only these variants (repeatable)")
    sw.add_argument("--no-reuse", action="store_true",
                    help="train every variant, even one whose configuration matches a finished run in a sibling folder")
    sw.add_argument("--json", action="store_true")
    sw.set_defaults(func="sweep")

    co = sub.add_parser("cost", help="per-scheme parameters, FLOPs, memory and bytes at a preset's scale")
    co.add_argument("--preset", default="sd15", help="model preset (sd15, tiny)")
    co.add_argument("--json", action="store_true")
    co.set_defaults(func="cost")

    tl = sub.add_parser("timeline", help="predicted wall-clock per epoch per scheme for N clients on device/network "
                                         "profiles (sim/assets/profiles.toml)")
    tl.add_argument("--preset", default="sd15", help="model preset whose costs are simulated (sd15, tiny)")
    tl.add_argument("--clients", type=int, default=100)
    tl.add_argument("--client-device", default="laptop", help="device profile of every client")
    tl.add_argument("--server-device", default="a100", help="device profile of the server")
    tl.add_argument("--network", default="wifi", help="network profile of each client's link")
    tl.add_argument("--samples", type=int, default=None,
                    help="samples per epoch, all clients together (default: 50,000 = Fill50K for sd15; 2,000 tiny)")
    tl.add_argument("--batch-size", type=int, default=8)
    tl.add_argument("--local-steps", type=int, default=10, help="batches per client turn (FedAvg: per round)")
    tl.add_argument("--wire", default="fp32", choices=("fp32", "fp16"), help="precision of the cut-layer features")
    tl.add_argument("--utilisation", type=float, default=None,
                    help="fraction of peak FLOP/s reached, for both devices (default: each profile's assumption)")
    tl.add_argument("--figure", default=None, metavar="PNG",
                    help="also draw wall-clock against 1-1,000 clients for two settings into this file")
    tl.add_argument("--validate", default=None, metavar="DIR",
                    help="instead: measure one tiny run, predict another, run it and write DIR/validation.json "
                         "(about 8 minutes here)")
    tl.add_argument("--profiles", action="store_true", help="list the device and network profiles with sources")
    tl.add_argument("--json", action="store_true")
    tl.set_defaults(func="timeline")

    p = sub.add_parser("pretrain-base", help="train the tiny base diffusion model")
    p.add_argument("--out", required=True, help="output folder (diffusers format + logs)")
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--minutes", type=float, default=None, help="stop after this wall time")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--num-samples", type=int, default=20000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(func="pretrain")

    fn = sub.add_parser("feature-net", help="train the feature network of FID (project features), on the project's "
                                            "circles and faces or on a local dataset (--set dataset=PATH)")
    fn.add_argument("--out", default=None, help="output folder (a run reads it with --set feature-net=OUT); "
                                                "default, for the built-in data only: the committed weights' folder")
    fn.add_argument("--preset", default="default", help="experiment preset whose data keys are read (.toml or name)")
    fn.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="data keys as in a run: dataset=PATH, resolution, image-column, eval-samples, num-samples, ...")
    fn.add_argument("--rows", default="aux", choices=("aux", "all-but-eval"),
                    help="local data: the public auxiliary rows (default) or the clients' pool too; never the eval rows")
    fn.add_argument("--max-images", type=int, default=20000, help="local data: at most this many rows")
    fn.add_argument("--steps", type=int, default=2000)
    fn.add_argument("--seed", type=int, default=5000)
    fn.add_argument("--batch-size", type=int, default=64)
    fn.add_argument("--lr", type=float, default=2e-3)
    fn.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    fn.add_argument("--report", action="store_true",
                    help="train nothing: FID (project features) of the weights in --out against real and altered "
                         "images (built-in data: the model card's circle table; local data: eval rows vs other rows "
                         "and vs blurred, noisy and colour-shifted copies)")
    fn.add_argument("--n", type=int, default=64, help="--report: images per set (default 64)")
    fn.add_argument("--json", action="store_true", help="print one JSON object (no training log)")
    fn.set_defaults(func="feature_net")

    e = sub.add_parser("eval-base", help="measure the base model's prompt-colour accuracy")
    e.add_argument("--model", default=None, help="base model folder (default: the committed one)")
    e.add_argument("--n", type=int, default=64)
    e.add_argument("--steps", type=int, default=25, help="DDIM steps")
    e.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--grid", default=None, help="save a PNG grid of the samples here")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func="eval_base")
    return ap


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # lazy: the sub-commands pull in torch, diffusers and flwr (~10 s); --help and bad arguments need none
    from sim.commands import actions

    actions.setup_env()
    try:
        return int(getattr(actions, f"cmd_{args.func}")(args) or 0)
    except (ValueError, OSError) as e:  # bad input, a missing or unreadable path: say what, no traceback
        if os.environ.get("SPLITCONTROL_DEBUG"):
            raise
        _close_progress_bars()
        parser.exit(2, f"splitcontrol {args.command}: error: {e}\n")


def _close_progress_bars() -> None:
    """Clear any progress bar left open by the failure, so the error starts on its own line."""
    tqdm = sys.modules.get("tqdm")
    bars = list(getattr(tqdm.tqdm, "_instances", ())) if tqdm is not None else []
    for bar in bars:
        bar.close()
    if bars:
        sys.stderr.write("\n")


if __name__ == "__main__":
    sys.exit(main())

"""The runner: the same ControlNet task under every scheme of a config, side by side.

Each scheme gets the same frozen base model, the same initial ControlNet, the same
client partitions, the same per-client batch/timestep/noise streams and the same step
budget (``steps`` batches of ``batch-size``, all clients together). Output in ``out``:
``config.toml`` (the public keys), ``clients.toml`` (the client-side keys:
:mod:`sim.engine.clientside`), ``summary.json`` (a row per scheme plus the base model
without control), ``losses.jsonl`` (per-step loss per scheme), ``samples_<scheme>.png``
(condition | generated | target), ``summary.md`` (the table) and ``controlnet_<scheme>/``
(the trained ControlNet, diffusers format).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import functools
import math
import multiprocessing
import os
import signal
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np

from sim.core import jsonio
from sim.core.config import ExperimentConfig, PublicConfig
from sim.core.diffusion import BAR_POSITION_ENV, to_uint8
from sim.core.models import count_params, load_controlnet
from sim.core.plots import save_rows_grid
from sim.core.splits import aux_set
from sim.core.tables import markdown_table, print_table, table_columns
from sim.engine.clientside import load_run_config, resolved, write_run_config
from sim.engine.context import context_for
from sim.engine.evaluate import (comparisons_markdown, conditions_uint8, evaluate, inference_secret,
                                 paired_comparisons, per_condition)
from sim.engine.grid import discover, in_process_grid, quiet_flower_logs
from sim.engine.privacy import guarantee_columns, run_guarantees
from sim.engine.release import base_scores, release_check
from sim.engine.runfolder import (
    RunLock,
    begin,
    load_part,
    mark_complete,
    prepare,
    require_complete,
    save_part,
)
from sim.engine.scoring import run_attacks
from sim.engine.transcript import RecordingGrid, Transcript, peak_rss_mb, save_seen
from strategies import Channel, get_strategy


def train_scheme(scheme: str, cfg: PublicConfig, grid=None, node_ids=None, transcript=None):
    """Run one scheme of ``cfg`` through the Flower apps; returns its :class:`strategies.base.SchemeResult`.

    ``grid`` is any Flower grid whose nodes run :mod:`sim.engine.client_app` (default: an
    in-process grid with ``num-clients`` nodes, which needs ``cfg``'s client-side keys).
    """
    if grid is None:
        grid = in_process_grid(cfg)
    ctx = context_for(cfg)
    return run_strategy(scheme, ctx, grid, node_ids or discover(grid, cfg.num_clients), transcript,
                        timeout=cfg.message_timeout or None)


def run_strategy(scheme: str, ctx, grid, node_ids: list[int], transcript=None, settings=None,
                 timeout: float | None = None):
    """The server side of one scheme on ``grid``: the strategy gets the frozen UNet, the public
    initial ControlNet and the recipe (``settings``, default the context's); every message is
    recorded in ``transcript``; a client that has not replied within ``timeout`` seconds stops it."""
    cls = get_strategy(scheme)
    settings = settings or ctx.settings
    transcript = transcript if transcript is not None else Transcript()
    rgrid = RecordingGrid(grid, transcript, {n: i for i, n in enumerate(node_ids)}, scheme, timeout=timeout)
    strategy = cls(ctx.base.unet, ctx.controlnet, ctx.scheduler, settings, null_context=ctx.null_context)
    result = strategy.start(Channel(rgrid, node_ids, cls.message_type))
    result.extra["failed_replies"] = len(transcript.failures)  # what a tolerant strategy went on without
    if transcript.failures:
        result.extra["failures"] = list(transcript.failures)  # round, client, message type, reason
    # what a client of this scheme trains: a property of the scheme, computed on a public client
    public = ctx.public_client(scheme)
    result.client_trainable_params = public.trainable_parameters()
    result.extra["client_model_mb"] = round(public.model_state_bytes() / 2**20, 2)
    result.extra["server_peak_rss_mb"] = round(peak_rss_mb(), 1)
    return result


def summary_row(res, metrics: dict) -> dict:
    t = res.transcript
    return {
        "scheme": res.scheme, **metrics, "final_loss": res.final_loss,
        "client_trainable_params": res.client_trainable_params,
        "server_trainable_params": res.server_trainable_params,
        "bytes_up_per_step": t.bytes_up / res.steps, "bytes_down_per_step": t.bytes_down / res.steps,
        "messages_per_step": t.messages / res.steps, "steps": res.steps,
        "wall_s": round(res.wall_s, 2), "client_s": round(t.client_s, 2), "server_s": round(res.server_s, 2),
        "client_s_per_step": t.client_s / res.steps, "server_s_per_step": res.server_s / res.steps,
        "client_setup_s": round(t.client_setup_s, 2),
        "client_peak_rss_mb": round(t.client_peak_mb, 1), **res.extra,
    }


def check_finite_losses(scheme: str, losses: list[float], cfg: PublicConfig) -> None:
    """Refuse a diverged run before anything is evaluated or written (ValueError: the CLI exits 2)."""
    bad = next((i for i, v in enumerate(losses) if not math.isfinite(v)), None)
    if bad is not None:
        raise ValueError(f"{scheme}: the training loss is {losses[bad]} at step {bad + 1} of {len(losses)}: the run "
                         f"diverged (lr={cfg.lr}, high-noise-weight={cfg.high_noise_weight}, "
                         f"batch-size={cfg.batch_size}); lower lr and run again")


def _external_weights(cfg: PublicConfig) -> dict:
    """evaluate()'s keywords for the metrics that need user-supplied weights (None when not given)."""
    return {"inception_weights": cfg.inception_weights or None, "clip_weights": cfg.clip_weights or None,
            "feature_net": cfg.feature_net or None}


def _control_sampling(cfg: PublicConfig) -> dict:
    """evaluate()'s keywords for where and how strongly the control acts under guidance."""
    return {"uncond_control": cfg.uncond_control, "control_guidance": cfg.control_guidance,
            "control_from": cfg.control_from, "control_boost": cfg.control_boost,
            "control_boost_above": cfg.control_boost_above}


@functools.lru_cache(maxsize=2)
def release_reference(ctx) -> tuple[dict, np.ndarray]:
    """The release check's public conditions and the base model's scores on them: they depend on the
    public configuration only, so the schemes of one context (one process) share them."""
    cfg = ctx.cfg
    aux = aux_set(cfg, ctx.base.preset.image_size, cfg.release_check)
    return aux, base_scores(ctx.base, aux, "fg" in ctx.eval_set, cfg.ddim_steps, cfg.guidance, cfg.seed)


def checked_release(cfg: PublicConfig, ctx, scheme: str, controlnet) -> dict:
    """The release check's row columns (:mod:`sim.engine.release`; withholds ``controlnet`` in place
    when it controls no better than none); {} with ``release-check`` = 0."""
    if not cfg.release_check:
        return {}
    aux, without = release_reference(ctx)
    check = release_check(ctx.base, aux, scheme, controlnet, circles="fg" in ctx.eval_set, steps=cfg.ddim_steps,
                          guidance=cfg.guidance, seed=cfg.seed, without=without, defenses=cfg.defenses,
                          secret=inference_secret(cfg), **_control_sampling(cfg))
    return {"released": check["released"], "release_metric": check["metric"],
            "release_with_control": check["with_control"], "release_without": check["without"],
            "release_p": check["p"]}


def run_job(cfg: PublicConfig, scheme: str | None, position: int = 0, out: Path | None = None,
            grid=None, node_ids=None) -> dict:
    """Train one scheme (or, for ``None``, only sample the base model without control) and score it.

    Runs in the calling process or in a worker process; everything it needs comes from ``cfg``
    (and ``grid``: where the clients run; default: an in-process grid, which needs the
    client-side keys of an :class:`ExperimentConfig`).
    """
    os.environ[BAR_POSITION_ENV] = str(position)
    quiet_flower_logs()
    ctx = context_for(cfg)
    base, eval_set, controlnet, frozen_before = ctx.base, ctx.eval_set, ctx.controlnet, ctx.frozen_fingerprint
    transcript, rounds = [], []
    if scheme is None:
        metrics, imgs = evaluate(base, eval_set, None, None, cfg.ddim_steps, cfg.guidance, cfg.seed,
                                 "sampling base (no control)", **_external_weights(cfg))
        row, losses = {"scheme": "base (no control)", **metrics, "steps": 0}, []
    else:
        res = train_scheme(scheme, cfg, grid=grid, node_ids=node_ids,
                           transcript=Transcript(keep=cfg.keep_messages, keep_last=cfg.keep_from == "end"))
        check_finite_losses(scheme, res.losses, cfg)
        release = checked_release(cfg, ctx, scheme, res.controlnet)
        metrics, imgs = evaluate(base, eval_set, scheme, res.controlnet, cfg.ddim_steps, cfg.guidance, cfg.seed,
                                 f"sampling {scheme}", defenses=cfg.defenses, secret=inference_secret(cfg),
                                 **_control_sampling(cfg), **_external_weights(cfg))
        transcript = [dataclasses.asdict(s) for s in res.transcript.stats]
        row, losses = {**summary_row(res, metrics), **release}, res.losses
        row.update(guarantee_columns(run_guarantees(cfg, scheme, transcript)))
        rounds = round_metrics(res)
        if out is not None:  # the trained ControlNet, so the run can be re-evaluated later
            res.controlnet.save_pretrained(out / f"controlnet_{scheme}")
            if cfg.keep_messages:  # what the server saw, for the attacks
                save_seen(res.transcript, out / f"seen_{scheme}.pt")
    return {"row": row, "losses": losses, "images": imgs, "frozen_before": frozen_before,
            "transcript": transcript, "rounds": rounds,
            "frozen_after": ctx.frozen_now(),
            "base_params": count_params(base.unet), "controlnet_params": count_params(controlnet)}


def round_metrics(res) -> list[dict]:
    """Per round (a FedAvg round, or one client's turn in split learning): steps, mean loss, bytes, times."""
    rows: dict[int, dict] = {}
    for s in res.transcript.stats:
        row = rows.setdefault(s.round, {"scheme": res.scheme, "round": s.round, "first_step": s.first_step,
                                        "last_step": s.first_step, "messages": 0, "bytes_up": 0,
                                        "bytes_down": 0, "client_s": 0.0})
        row["first_step"] = min(row["first_step"], s.first_step)
        row["last_step"] = max(row["last_step"], s.first_step + s.num_steps - 1)
        row["messages"] += 1
        row["bytes_up"] += s.bytes_up
        row["bytes_down"] += s.bytes_down
        row["client_s"] += s.client_s
    out = []
    for r in sorted(rows.values(), key=lambda r: r["round"]):
        seg = res.losses[r["first_step"]: r["last_step"] + 1]
        out.append({**r, "steps": len(seg), "loss": float(np.mean(seg)) if seg else None,
                    "client_s": round(r["client_s"], 4)})
    return out


def die_with_parent(parent_pid: int) -> None:
    """Worker initializer: the kernel kills this process when its parent dies, by any signal (Linux
    ``prctl(PR_SET_PDEATHSIG)``), so no worker trains on into a dead run's folder; elsewhere a no-op."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before the line above took effect
        os._exit(1)


def stop_workers(pool: ProcessPoolExecutor, failed: bool = True) -> None:
    """Shut ``pool`` down. After a failure, now: a scheme that failed ends the run at once, the others'
    workers killed (as multiprocessing.Pool's terminate did; concurrent.futures, which reports a worker
    that died, has no public terminate). After a normal finish the idle workers exit on their own: killing
    them would leave the semaphores they created (tqdm's locks) to the resource tracker, which warns
    about them at exit."""
    if failed:
        for proc in list((pool._processes or {}).values()):
            proc.terminate()
    pool.shutdown(wait=True, cancel_futures=True)


def run_compare(cfg: PublicConfig, out: str | Path, grid=None, node_ids=None, overwrite: bool = False,
                resume: bool = False) -> dict:
    """Train every scheme of ``cfg``, evaluate, write the run folder; returns the summary.

    Without ``grid`` every scheme gets its own in-process grid of clients provisioned with
    ``cfg``'s client-side keys (an :class:`ExperimentConfig`; an unset client seed is drawn
    fresh and saved in clients.toml), and with ``jobs`` > 1 the schemes (and the no-control
    baseline) run in that many worker processes, each with ``threads`` torch threads; the
    schemes are independent, so the numbers are the same as in one process with the same
    ``threads``. With a ``grid`` (the ServerApp under Flower's engines) the schemes take
    turns on it in this process, and ``cfg`` is public: the clients hold their own keys,
    so no clients.toml is written and attacks (whose scorer needs it) are refused.

    The folder is locked while it is written, refused if it holds another run (``overwrite``
    empties a run folder first), and marked complete at the very end; an unfinished run of
    the same configuration is finished with ``resume`` (:mod:`sim.engine.runfolder`).
    """
    out = Path(out)
    with RunLock(out):
        again = prepare(out, cfg, overwrite=overwrite, resume=resume)
        if again is not None:  # the folder's own keys (its client seed), this call's process split and attacks
            cfg = dataclasses.replace(again, jobs=cfg.jobs, threads=cfg.threads, attacks=cfg.attacks)
        summary = _run_compare(cfg, out, grid, node_ids)
        mark_complete(out, summary)
    return summary


def _run_compare(cfg: PublicConfig, out: Path, grid, node_ids) -> dict:
    if isinstance(cfg, ExperimentConfig):
        cfg = resolved(cfg)
        write_run_config(out, cfg)
    elif grid is None:
        raise ValueError("run_compare without a grid provisions the clients: it needs their client-side keys "
                         "(an ExperimentConfig, not a PublicConfig)")
    else:
        if cfg.attacks:
            raise ValueError("attacks are scored against the clients' data, whose keys a ServerApp does not hold: "
                             "run them afterwards with `splitcontrol attack --run OUT` where clients.toml is")
        (out / "config.toml").write_text(cfg.to_toml())
    begin(out)
    t_start = time.time()
    jobs = [(cfg, None, 0, out)] if cfg.baseline else []
    jobs += [(cfg, s, (i + 1) % cfg.jobs, out) for i, s in enumerate(cfg.schemes)]
    names = ["base" if j[1] is None else j[1] for j in jobs]
    results = [load_part(out, n) for n in names]  # a resumed run's finished jobs
    todo = [i for i, r in enumerate(results) if r is None]
    if todo and len(todo) < len(jobs):
        print(f"resuming {out}: {', '.join(n for i, n in enumerate(names) if i not in todo)} already done; "
              f"running {', '.join(names[i] for i in todo)}")

    def done(i: int, result: dict) -> None:
        results[i] = result
        save_part(out, names[i], result)

    if grid is not None:
        for i in todo:
            c, s, _, o = jobs[i]
            done(i, run_job(c, s, 0, o, grid, node_ids))
    elif cfg.jobs == 1 or len(todo) == 1:
        for i in todo:
            done(i, run_job(*jobs[i]))
    elif todo:
        pool = ProcessPoolExecutor(min(cfg.jobs, len(todo)), mp_context=multiprocessing.get_context("spawn"),
                                   initializer=die_with_parent, initargs=(os.getpid(),))
        failed = True
        try:
            futures = {pool.submit(run_job, *jobs[i]): i for i in todo}
            for future in as_completed(futures):
                done(futures[future], future.result())
            failed = False
        except BrokenProcessPool:
            raise RuntimeError(
                "a worker process died before finishing its scheme. A script that calls run_compare with "
                "jobs > 1 must do so under `if __name__ == \"__main__\":` (every worker imports the script "
                "again); otherwise it was killed (out of memory?). jobs=1 runs in this process.") from None
        finally:
            stop_workers(pool, failed)

    trained = results[1:] if cfg.baseline else results
    eval_set = context_for(cfg).eval_set
    conds, targets = conditions_uint8(eval_set["condition"]), to_uint8(eval_set["target"])
    with (out / "losses.jsonl").open("w") as f:
        for r in trained:
            f.write(jsonio.dumps({"scheme": r["row"]["scheme"], "losses": r["losses"]}) + "\n")
    with (out / "rounds.jsonl").open("w") as f:
        for r in trained:
            f.writelines(jsonio.dumps(row) + "\n" for row in r["rounds"])
    with (out / "transcript.jsonl").open("w") as f:
        for r in trained:
            f.writelines(jsonio.dumps(row) + "\n" for row in r["transcript"])
    np.savez_compressed(out / "samples.npz", condition=conds[:16], target=targets[:16],
                        **{r["row"]["scheme"].split()[0]: r["images"][:16] for r in results})
    for r in results:
        name = r["row"]["scheme"]
        save_rows_grid({"condition": conds[:16], name: r["images"][:16], "target": targets[:16]},
                       out / f"samples_{name.split()[0]}.png", title=f"{name}: condition | generated | target")
    rows = [r["row"] for r in results]
    fingerprints = {r["frozen_before"] for r in results} | {r["frozen_after"] for r in results}
    summary = {
        "experiment": cfg.experiment, "rows": rows,
        "frozen_base_unchanged": len(fingerprints) == 1,
        "base_params": results[0]["base_params"], "controlnet_params": results[0]["controlnet_params"],
        "total_wall_s": round(time.time() - t_start, 1),
    }
    per = {r["row"]["scheme"].split()[0]: per_condition(r["images"], eval_set) for r in results}
    write_per_condition(out, per)
    summary["comparisons"] = paired_comparisons(per)
    (out / "summary.json").write_text(jsonio.dumps(summary, indent=2))
    (out / "summary.md").write_text(summary_markdown(summary))
    print_table(rows, table_columns(rows))
    if summary["comparisons"]:
        print(comparisons_markdown(summary["comparisons"]))
    if cfg.attacks:
        summary["attacks"] = {}
        for r in run_attacks(out, list(cfg.attacks)):
            summary["attacks"].setdefault(r["scheme"], []).append(r)
    print(f"frozen base unchanged: {summary['frozen_base_unchanged']}; wrote {out} in {summary['total_wall_s']} s")
    return summary


def write_per_condition(out: Path, per: dict[str, dict]) -> None:
    """per_condition.json: each sampled model's score per eval condition (for paired comparisons,
    also across the runs of a sweep, whose eval conditions and sampling noise are the same)."""
    (out / "per_condition.json").write_text(jsonio.dumps(
        {name: {m: [float(v) for v in vals] for m, vals in scores.items()} for name, scores in per.items()}))


def summary_markdown(summary: dict) -> str:
    """summary.md: the rows, then (with two or more sampled models) their paired comparisons."""
    rows = summary["rows"]
    text = markdown_table(rows, table_columns(rows)) + "\n"
    if summary.get("comparisons"):
        n = summary["comparisons"][0]["n"]
        text += (f"\nPaired comparisons over the same {n} conditions and initial noise (paired t-test; "
                 "resolved: p < 0.05):\n\n" + comparisons_markdown(summary["comparisons"]) + "\n")
    return text


EVAL_KEYS = ("guidance", "uncond-control", "control-guidance", "control-from", "control-boost", "control-boost-above",
             "release-check", "ddim-steps", "eval-samples", "seed", "inception-weights", "clip-weights", "feature-net")


def reevaluate(run_dir: str | Path, overrides: list[str] = (), update: bool = False) -> list[dict]:
    """Sample and score a finished run's saved ControlNets again, e.g. at another guidance.

    ``overrides`` may change only the evaluation keys (:data:`EVAL_KEYS`); the run's
    ``config.toml`` gives the rest. Returns a row per scheme plus the base without control
    (if the run sampled it). ``update`` writes the new metrics into the run's summary.json
    rows (e.g. after the evaluation code changed), recording the overrides used.
    ``--set clip-weights=PATH`` / ``inception-weights=PATH`` add ``clip_score`` /
    ``fid_inception`` from local weights; ``--set clip-weights=`` turns off a path the
    run's config.toml names but this machine lacks.
    """
    run = Path(run_dir)
    require_complete(run, "evaluate")
    for item in overrides:
        key = item.split("=", 1)[0].strip().replace("_", "-")
        if key not in EVAL_KEYS:
            raise ValueError(f"evaluate can only change the evaluation keys {list(EVAL_KEYS)}, not {key!r}")
    cfg = load_run_config(run, overrides)
    ctx = context_for(cfg)
    base, eval_set = ctx.base, ctx.eval_set
    rows, images = [], {}
    if cfg.baseline:
        metrics, images["base"] = evaluate(base, eval_set, None, None, cfg.ddim_steps, cfg.guidance, cfg.seed,
                                           "sampling base (no control)", **_external_weights(cfg))
        rows.append({"scheme": "base (no control)", **metrics})
    saved = {s: load_controlnet(run / f"controlnet_{s}") for s in cfg.schemes}  # all readable before any sampling
    for scheme, controlnet in saved.items():
        release = checked_release(cfg, ctx, scheme, controlnet)  # withholds the loaded copy only
        metrics, images[scheme] = evaluate(base, eval_set, scheme, controlnet, cfg.ddim_steps, cfg.guidance, cfg.seed,
                              f"sampling {scheme}", defenses=cfg.defenses, secret=inference_secret(cfg),
                              **_control_sampling(cfg), **_external_weights(cfg))
        rows.append({"scheme": scheme, **metrics, **release})
    if update and (run / "summary.json").exists():
        summary = jsonio.read(run / "summary.json")
        new = {r["scheme"]: r for r in rows}
        for r in summary["rows"]:
            r.update(new.get(r["scheme"], {}))
        summary["reevaluated"] = list(overrides) or True
        per = {name: per_condition(imgs, eval_set) for name, imgs in images.items()}
        write_per_condition(run, per)
        summary["comparisons"] = paired_comparisons(per)
        (run / "summary.json").write_text(jsonio.dumps(summary, indent=2))
        (run / "summary.md").write_text(summary_markdown(summary))
    return rows

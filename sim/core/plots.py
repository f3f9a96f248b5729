"""Image grids and figures written with matplotlib (Agg backend, files only)."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

from sim.core import jsonio


def image_grid(images: np.ndarray, ncol: int, pad: int = 1, fill: int = 255) -> np.ndarray:
    """Tile (N, H, W, 3) uint8 images into one (rows*H, ncol*W, 3) array with ``pad`` px gaps."""
    n, h, w, c = images.shape
    nrow = -(-n // ncol)
    grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), fill, dtype=np.uint8)
    for i, img in enumerate(images):
        r, q = divmod(i, ncol)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = img
    return grid


def save_image_grid(images: np.ndarray, path: str | Path, ncol: int = 8, scale: int = 4) -> Path:
    """Save a grid PNG, upscaled ``scale`` x with nearest neighbour so small images stay readable."""
    plt = _plt()
    grid = image_grid(np.asarray(images), ncol)
    grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    plt.imsave(path, grid)
    return path


def save_rows_grid(rows: dict[str, np.ndarray], path: str | Path, scale: int = 4, title: str | None = None) -> Path:
    """One labelled row per entry (e.g. condition | generated | target), same number of images each."""
    plt = _plt()
    names = list(rows)
    ncol = min(len(v) for v in rows.values())
    fig, axes = plt.subplots(len(names), 1, figsize=(ncol * 0.6 + 1.5, len(names) * 0.75 + 0.4), squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        ax.imshow(image_grid(np.asarray(rows[name][:ncol]), ncol), interpolation="nearest")
        ax.set_yticks([])
        ax.set_xticks([])
        ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    return _finish(plt, fig, path, title, dpi=120)


def _finish(plt, fig, path: str | Path, title: str | None, dpi: int) -> Path:
    """Title, tight layout, save (creating the folder), close; returns the path."""
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- run figures
SCHEME_COLOURS = {"fedavg": "#1f77b4", "vanilla": "#ff7f0e", "nograd": "#2ca02c", "splitfed": "#9467bd"}


def _plt():
    """pyplot on the headless backend, chosen only when a figure is drawn (a notebook keeps its own)."""
    import matplotlib  # lazy: importing this module must not switch an interactive session's backend

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: after the backend is chosen

    return plt


def _moving_average(x: list[float], window: int) -> np.ndarray:
    x = np.asarray(x, dtype=float)
    window = max(1, min(window, len(x)))
    return np.convolve(x, np.ones(window) / window, mode="valid")


MANY_SERIES = 4  # more curves than this: a wider figure with the legend outside the axes


def _series_axes(plt, n: int):
    """Figure and axes for ``n`` line series (wider when the legend goes outside)."""
    return plt.subplots(figsize=(6 + 2.2 * (n > MANY_SERIES), 3.5))


def _series_legend(ax, n: int, **kw) -> None:
    """The legend of ``n`` line series: inside the axes for a few, small and to the right of them for many."""
    if n > MANY_SERIES:
        kw = {"fontsize": 7, **kw, "loc": "center left", "bbox_to_anchor": (1.01, 0.5)}
    ax.legend(**kw)


def plot_run(run_dir: str | Path, colour=None) -> list[Path]:
    """Figures of a results folder, drawn from its files alone: loss.png, bytes.png, client_cost.png, samples.png.

    ``colour`` maps a row's scheme label to a colour (default: the scheme colours, grey otherwise)."""
    run = Path(run_dir)
    summary_path = run / "summary.json"
    if not summary_path.exists():
        raise FileNotFoundError(f"{run} has no summary.json: is it a results folder of `splitcontrol compare/run`?")
    summary = jsonio.read(summary_path)
    rows = [r for r in summary["rows"] if r["scheme"] in SCHEME_COLOURS or "bytes_up_per_step" in r]
    schemes = [r["scheme"] for r in rows]
    colour_of = colour or (lambda s: SCHEME_COLOURS.get(s, "grey"))
    colour = [colour_of(s) for s in schemes]
    plt = _plt()
    written = []

    # loss per scheme
    losses = {}
    if (run / "losses.jsonl").exists():
        for line in (run / "losses.jsonl").read_text().splitlines():
            d = json.loads(line)
            losses[d["scheme"]] = d["losses"]
    if losses:
        fig, ax = _series_axes(plt, len(losses))
        for i, (s, ls) in enumerate(losses.items()):
            w = max(1, len(ls) // (10 if len(losses) > MANY_SERIES else 40))  # many curves: smooth more
            ma = _moving_average(ls, w)
            ax.plot(np.arange(len(ma)) + w, ma, ["-", "--", ":", "-."][i % 4], label=s, color=colour_of(s))
        ax.set_xlabel("training step (all clients)")
        ax.set_ylabel("loss (moving average)")
        ax.set_yscale("log")
        ax.set_title("Training loss per scheme (same data, seeds and steps)", fontsize=10)
        _series_legend(ax, len(losses))
        fig.tight_layout()
        written.append(run / "loss.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)

    # bytes per step each way
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(rows)), 3.8))
    x = np.arange(len(rows))
    tick = {"rotation": 30, "ha": "right", "fontsize": 8} if len(rows) > 3 else {}
    up = [max(r["bytes_up_per_step"], 1e-1) for r in rows]
    down = [max(r["bytes_down_per_step"], 1e-1) for r in rows]
    b1 = ax.bar(x - 0.2, up, 0.4, label="client -> server", color=colour)
    b2 = ax.bar(x + 0.2, down, 0.4, label="server -> client", color=colour, alpha=0.45, hatch="//")
    many = len(rows) > 5
    for bars, vals in ((b1, up), (b2, down)):
        for bar, v in zip(bars, vals):
            ax.annotate(_human_bytes(v), (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom",
                        fontsize=6 if many else 7, rotation=90 if many else 0)
    ax.set_xticks(x, schemes, **tick)
    ax.set_yscale("log")
    ax.set_ylim(top=max(up + down) * (60 if many else 8))  # room for the value labels
    ax.set_ylabel("bytes per training step")
    ax.set_title("Communication per step (log scale; solid: up, hatched: down)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(run / "bytes.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    # client time and memory, trainable parameters
    if len(rows) > 4:  # many variants: one panel per row
        fig, axes = plt.subplots(3, 1, figsize=(max(6, 0.8 * len(rows)), 9))
    else:
        fig, axes = plt.subplots(1, 3, figsize=(10, 3.2))
    panels = [("client_s_per_step", "client compute s / step"),
              ("client_model_mb", "client model + optimizer state (MiB)"),
              ("client_trainable_params", "client trainable parameters")]
    for ax, (key, label) in zip(axes, panels):
        vals = [float(r.get(key, 0) or 0) for r in rows]
        ax.bar(x, vals, color=colour)
        for xi, v in zip(x, vals):
            ax.annotate(f"{v:.3g}", (xi, v), ha="center", va="bottom", fontsize=7)
        ax.set_xticks(x, schemes, **tick)
        if key == "client_s_per_step" and min(vals, default=0) > 0:
            ax.set_yscale("log")
            label += " (log scale)"
        ax.set_title(label, fontsize=9)
    fig.suptitle("What the client device pays", fontsize=10)
    fig.tight_layout()
    written.append(run / "client_cost.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    # samples: condition | every scheme | target
    if (run / "samples.npz").exists():
        data = np.load(run / "samples.npz")
        order = ["condition"] + [k for k in data.files if k not in ("condition", "target")] + ["target"]
        written.append(save_rows_grid({k: data[k][:16] for k in order}, run / "samples.png",
                                      title="condition | generated per scheme | target"))
    return written


def _human_bytes(v: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(v) < 1000:
            return f"{v:.3g} {unit}"
        v /= 1000
    return f"{v:.3g} TB"


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points not dominated when lower x (leakage) and higher y (utility) are better."""
    front = []
    for i, (x, y) in enumerate(points):
        if not any((x2 <= x and y2 >= y) and (x2 < x or y2 > y) for j, (x2, y2) in enumerate(points) if j != i):
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def _spread_labels(ax, pts: list[tuple[float, float]], labels: list[str]) -> None:
    """Label points without overlaps: points sharing (about) the same x get their labels in a
    column to the left, pushed apart vertically, each joined to its point by a thin line."""
    if not pts:
        return
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    xr, yr = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 1.0
    gap = 0.045 * yr
    clusters: list[list[int]] = []
    for i in sorted(range(len(pts)), key=lambda i: xs[i]):
        if clusters and xs[i] - xs[clusters[-1][0]] < 0.12 * xr:
            clusters[-1].append(i)
        else:
            clusters.append([i])
    for members in clusters:
        members.sort(key=lambda i: ys[i])
        placed = [ys[i] for i in members]
        for k in range(1, len(placed)):  # push up to keep the gap ...
            placed[k] = max(placed[k], placed[k - 1] + gap)
        cap = max(ys) + 2 * gap
        if placed[-1] > cap:  # ... then down from the top, so labels stay near their points
            placed[-1] = cap
            for k in range(len(placed) - 2, -1, -1):
                placed[k] = min(placed[k], placed[k + 1] - gap)
        many = len(members) > 1
        left = xs[members[0]] > min(xs) + 0.6 * xr  # near the right edge: labels to the left
        for i, ly in zip(members, placed):
            edge = min(xs[j] for j in members) if left else max(xs[j] for j in members)
            lx = edge + (-0.06 if left else 0.05) * xr if many else xs[i] + 0.012 * xr
            ax.annotate(labels[i], (xs[i], ys[i]), xytext=(lx, ly), fontsize=7, va="center",
                        ha="right" if left and many else "left",
                        arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "grey"} if many else None)


def plot_privacy_utility(sweep_json: str | Path, out: str | Path | None = None,
                         utility: str = "outline_iou", blind: float | None = None) -> Path:
    """Privacy (best attack SSIM over the attacks that ran, lower is better) against utility, one
    point per (variant, scheme) of a sweep, with the Pareto front; from sweep.json alone. ``blind``:
    the same score of a guess made without any transcript (a vertical line)."""
    plt = _plt()
    path = Path(sweep_json)
    rows = jsonio.read(path)
    pts, labels, schemes = [], [], []
    for r in rows:
        ssims = [v for k, v in r.items() if k.startswith("attack:") and isinstance(v, (int, float))
                 and "prompt" not in k]
        if not ssims or r.get(utility) is None:
            continue
        pts.append((max(ssims), r[utility]))
        labels.append(r["variant"])
        schemes.append(r["scheme"])
    fig, ax = plt.subplots(figsize=(7, 5))
    colours = {"nograd": "tab:green", "vanilla": "tab:orange", "fedavg": "tab:blue"}
    for (x, y), sc in zip(pts, schemes):
        ax.scatter(x, y, color=colours.get(sc, "grey"), s=40, zorder=3)
    _spread_labels(ax, pts, labels)
    front = pareto_front(pts)
    if front:
        ax.step([pts[i][0] for i in front], [pts[i][1] for i in front], "k--", where="post", lw=1,
                label="Pareto front", zorder=2)
    base = next((r.get("base_outline_iou") for r in rows if r.get("base_outline_iou") is not None), None)
    if base is not None and utility == "outline_iou":
        ax.axhline(base, color="grey", lw=0.8, ls=":", label=f"base model, no control ({base:.2f})")
    if blind is not None:
        ax.axvline(blind, color="tab:red", lw=0.8, ls=":", label=f"blind guess, no transcript ({blind:.2f})")
    for sc, c in colours.items():
        if sc in schemes:
            ax.scatter([], [], color=c, label=sc)
    ax.set_xlabel("leakage: best attack SSIM on private images/hints (lower is better)")
    ax.set_ylabel(f"utility: {utility} (higher is better)")
    ax.set_title("Privacy vs utility per defense")
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out) if out else path.parent / f"privacy_{utility}.png"
    fig.savefig(out, dpi=130)
    plt.close(fig)
    return out


FAMILY_MARKERS = {"none": "o", "pp-reference": "s", "latent-dp": "^", "one-shot": "D"}


def plot_frontier(sweep_json: str | Path, target: str = "image", out: str | Path | None = None) -> Path:
    """The privacy/utility frontier for one target (``image`` or ``hint``): per (variant, scheme) the
    strongest attack's mean SSIM on that target (x, lower = more private) against outline IoU (y,
    higher = more useful), both with standard-error bars; the blind guess of that target (no
    transcript) as a vertical line, the base model without control as a horizontal one, and the
    Pareto front. Colour: scheme; marker: defense family (latent-dp, one-shot, ...)."""
    plt = _plt()
    path = Path(sweep_json)
    rows = [r for r in jsonio.read(path)
            if r.get(f"best_{target}") is not None and r.get("outline_iou") is not None]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    pts = [(r[f"best_{target}"], r["outline_iou"]) for r in rows]
    front = pareto_front(pts)
    if front:
        ax.step([pts[i][0] for i in front], [pts[i][1] for i in front], color="0.3", ls="--", where="post", lw=1,
                label="Pareto front", zorder=1)
    for r, (x, y) in zip(rows, pts):
        family = next((f for f in FAMILY_MARKERS if f in " ".join(r.get("defenses") or ["none"])), "none")
        ax.errorbar(x, y, xerr=r.get(f"best_{target}_se") or 0, yerr=r.get("outline_iou_se") or 0,
                    fmt=FAMILY_MARKERS[family], color=SCHEME_COLOURS.get(r["scheme"], "grey"), ms=6, capsize=2,
                    lw=0.8, zorder=3)
    _spread_labels(ax, pts, [r["variant"] for r in rows])
    blind = next((r[f"blind_{target}"] for r in rows if r.get(f"blind_{target}") is not None), None)
    if blind is not None:
        ax.axvline(blind, color="tab:red", lw=0.9, ls=":", label=f"blind guess of the {target}, no transcript "
                                                                  f"({blind:.2f})")
    base = next((r["base_outline_iou"] for r in rows if r.get("base_outline_iou") is not None), None)
    if base is not None:
        ax.axhline(base, color="grey", lw=0.9, ls=":", label=f"base model, no control ({base:.2f})")
    for sc in sorted({r["scheme"] for r in rows}):
        ax.plot([], [], "o", color=SCHEME_COLOURS.get(sc, "grey"), label=sc)
    for fam in [f for f in FAMILY_MARKERS if any(f in " ".join(r.get("defenses") or ["none"]) for r in rows)]:
        ax.plot([], [], FAMILY_MARKERS[fam], color="0.4", mfc="none", label=fam)
    ax.set_xlabel(f"leakage: strongest attack's mean SSIM on the private {target}s (lower is better)")
    ax.set_ylabel("utility: outline IoU, mean +- SE (higher is better)")
    ax.set_title(f"Privacy/utility frontier ({target}s): each point its strongest attack")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out) if out else path.parent / f"frontier_{target}.png"
    fig.savefig(out, dpi=130, bbox_inches="tight")
    plt.close(fig)
    return out


def _scheme_colour(label: str) -> str:
    """The colour of the scheme a label names (``nograd``, ``vanilla-nopeek``, ...), grey if none."""
    return next((c for s, c in SCHEME_COLOURS.items() if s in label), "grey")


def plot_sweep_curves(sweep_json: str | Path, x_label: str, blind: dict | None = None) -> list[Path]:
    """Utility and leakage against a swept number (the variants' ``x``), one line per (scheme,
    ``group``): ``sweep_utility.png`` (outline IoU, colour accuracy, FID on project features) and,
    when attacks ran, ``sweep_leakage.png``: per attack the mean SSIM of reconstructed private
    images (solid) and hints (dashed), or prompt accuracy, with ``blind`` ({"image", "hint"}: a
    transcript-free guess's SSIM) as dotted lines."""
    plt = _plt()
    path = Path(sweep_json)
    rows = [r for r in jsonio.read(path) if r.get("x") is not None]
    lines: dict[str, list[dict]] = {}
    for r in rows:
        lines.setdefault(r["scheme"] + (f" ({r['group']})" if r.get("group") else ""), []).append(r)
    styles = ["-o", "--s", ":^", "-.v"]
    groups = sorted({r.get("group", "") for r in rows})
    xs = [r["x"] for r in rows]
    log_x = bool(xs) and min(xs) > 0 and max(xs) / min(xs) >= 8
    attacks = sorted({k[7:] for r in rows for k in r if k.startswith("attack:")})
    panels = {"sweep_utility.png": [(("outline_iou",), "outline IoU (higher is better)"),
                                    (("colour_acc",), "prompt-colour accuracy"),
                                    (("fid_project",), "FID (project features, lower is better)")],
              "sweep_leakage.png": [((f"image:{a}", f"hint:{a}", f"attack:{a}"), a + (" accuracy" if "prompt" in a else
                                     " SSIM: image (solid), hint (dashed)")) for a in attacks]}
    def numeric(key: str) -> bool:  # some row has a number under key (not N/A, not missing)
        return any(isinstance(r.get(key), (int, float)) for r in rows)

    written = []
    for name, keys in panels.items():
        keys = [(ks, lab) for ks, lab in keys if any(numeric(k) for k in ks)]
        if not keys:
            continue
        fig, axes = plt.subplots(1, len(keys), figsize=(3.8 * len(keys), 3.4), squeeze=False)
        for ax, (ks, label) in zip(axes[0], keys):
            parts = [k for k in ks[:2] if numeric(k)] or [ks[-1]]
            for line, rs in sorted(lines.items()):
                for j, key in enumerate(parts):
                    pts = sorted((r["x"], r[key]) for r in rs if isinstance(r.get(key), (int, float)))
                    if pts:
                        style = styles[(groups.index(rs[0].get("group", "")) + j) % len(styles)]
                        ax.plot(*zip(*pts), style, color=_scheme_colour(line), ms=4,
                                label=line if len(parts) == 1 else f"{line}: {key.split(':')[0]}")
            if name == "sweep_leakage.png":
                ax.set_ylim(-0.02, 1.02)
                for key in parts:
                    target = key.split(":")[0]
                    if blind and target in blind:
                        ax.axhline(blind[target], color="grey", lw=0.8, ls=":")
                        ax.annotate(f"blind {target}", (min(xs), blind[target]), fontsize=6, color="grey",
                                    xytext=(0, 2), textcoords="offset points")
            if ks[0] == "outline_iou" and rows and rows[0].get("base_outline_iou") is not None:
                ax.axhline(rows[0]["base_outline_iou"], color="grey", lw=0.8, ls=":", label="base, no control")
            if log_x:
                ax.set_xscale("log", base=2)
                ax.set_xticks(sorted(set(xs)), [f"{x:g}" for x in sorted(set(xs))])
            ax.set_xlabel(x_label, fontsize=8)
            ax.set_title(label, fontsize=9)
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=7)
        fig.suptitle(("Utility" if "utility" in name else "Leakage") + f" against {x_label}", fontsize=10)
        fig.tight_layout()
        written.append(path.parent / name)
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written


def plot_variants(out: str | Path, names: list[str]) -> list[Path]:
    """``plot_run``'s loss, bytes and client-cost figures across a sweep's variants (one bar or
    curve per variant and scheme), written to ``out``; per-round loss curves in ``rounds.png``."""
    out = Path(out)
    rows, losses, rounds = [], [], []
    for name in names:
        run = out / name
        if not (run / "summary.json").exists():
            continue
        def label(scheme: str) -> str:  # "nograd-none" names its scheme; "none" of a nograd run does not
            return name if scheme in name else f"{scheme} {name}"

        rows += [{**r, "scheme": label(r["scheme"])} for r in jsonio.read(run / "summary.json")["rows"]
                 if "bytes_up_per_step" in r]
        losses += [{**d, "scheme": label(d["scheme"])} for d in map(json.loads, (run / "losses.jsonl").read_text().splitlines())]
        rounds += [{**d, "label": label(d["scheme"])} for d in map(json.loads, (run / "rounds.jsonl").read_text().splitlines())]
    written = []
    with tempfile.TemporaryDirectory() as tmp:
        merged = Path(tmp)
        (merged / "summary.json").write_text(json.dumps({"rows": rows}))
        (merged / "losses.jsonl").write_text("".join(json.dumps(d) + "\n" for d in losses))
        for p in plot_run(merged, colour=_scheme_colour):
            written.append(out / p.name)
            written[-1].write_bytes(p.read_bytes())
    if rounds:
        plt = _plt()
        labels = sorted({d["label"] for d in rounds})
        fig, ax = _series_axes(plt, len(labels))
        for i, lab in enumerate(labels):
            rs = [d for d in rounds if d["label"] == lab and d.get("loss") is not None]
            w = max(1, min(3, len(rs)))
            ax.plot([d["last_step"] + 1 for d in rs][w - 1:], _moving_average([d["loss"] for d in rs], w),
                    ["-", "--", ":", "-."][i % 4], color=_scheme_colour(lab), label=lab)
        ax.set_xlabel("training step at the end of the round or turn")
        ax.set_ylabel("round's mean loss (3-round avg)")
        ax.set_yscale("log")
        ax.set_title("Per-round training loss", fontsize=10)
        _series_legend(ax, len(labels), fontsize=7)
        fig.tight_layout()
        written.append(out / "rounds.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written


def plot_timeline(data: dict, out: str | Path, title: str = "", dashed: dict | None = None) -> Path:
    """Wall-clock per epoch against the number of clients, one panel per device/network setting
    (``data[setting][scheme] = [[clients, wall_s], ...]``, :func:`sim.commands.timeline.scaling`);
    ``dashed[setting]``: schemes drawn dashed because their client state does not fit the client's memory."""
    plt = _plt()
    dashed = dashed or {}
    fig, axes = plt.subplots(1, len(data), figsize=(5.2 * len(data), 4.4), sharey=True, squeeze=False)
    for ax, (setting, curves) in zip(axes[0], data.items()):
        for scheme, pts in curves.items():
            x, y = zip(*pts)
            unfit = scheme in dashed.get(setting, ())
            ax.plot(x, np.asarray(y) / 3600, marker="o", ms=3.5, lw=1.6, ls="--" if unfit else "-",
                    label=f"{scheme} (does not fit client memory)" if unfit else scheme,
                    color=_scheme_colour(scheme))
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(setting, fontsize=10)
        ax.set_xlabel("number of clients (log)")
        ax.grid(True, which="both", alpha=0.25)
    axes[0][0].set_ylabel("wall-clock per epoch, hours (log; lower is better)")
    for ax in axes[0]:
        ax.legend(fontsize=7.5, loc="lower left")
    return _finish(plt, fig, out, title, dpi=130)

"""The summary table: a row per scheme as Markdown (what the README shows) or aligned text."""
from __future__ import annotations

TABLE_COLUMNS = ["scheme", "outline_iou", "outline_iou_se", "colour_acc", "colour_acc_se", "final_loss", "client_trainable_params",
                 "bytes_up_per_step", "bytes_down_per_step", "messages_per_step", "wall_s"]


ANY_DATA_COLUMNS = ["edge_f1", "psnr", "ssim", "fid_project"]  # in place of the circle metrics on other data


def table_columns(rows: list[dict]) -> list[str]:
    """The summary's columns: :data:`TABLE_COLUMNS` (on data without circle metrics, the circle columns
    replaced by :data:`ANY_DATA_COLUMNS`), plus the run-level (epsilon, delta) where a row has one."""
    columns = TABLE_COLUMNS
    if rows and not any("outline_iou" in r for r in rows):
        columns = ["scheme", *ANY_DATA_COLUMNS, *TABLE_COLUMNS[5:]]
    return columns + (["epsilon", "delta"] if any("epsilon" in r for r in rows) else [])


def cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.3e}"
    return str(v)


def markdown_table(rows: list[dict], columns: list[str] = TABLE_COLUMNS) -> str:
    """The summary as a Markdown table (what the README shows); missing cells stay empty."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def print_table(rows: list[dict], columns: list[str] = TABLE_COLUMNS) -> None:
    widths = [max(len(c), *(len(cell(r.get(c, ""))) for r in rows)) for c in columns]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(cell(r.get(c, "")).rjust(w) for c, w in zip(columns, widths)))



"""Table II as markdown: our rows, labelled, beside the paper's published numbers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

PAPER_TASKS = ("WBC", "pRCC", "CAM16")
PUBLISHED_TABLE_II: tuple[tuple[str, ...], ...] = (
    # init, method, data, then accuracy % (macro F1 %) for each of PAPER_TASKS
    ("random", "none", "none", "91.63 (85.35)", "73.85 (71.12)", "80.09 (79.94)"),
    ("random", "MAE", "ImageNet-1k", "97.17 (95.36)", "91.17 (90.66)", "93.98 (93.98)"),
    ("random", "MAE", "CPIA", "97.58 (95.83)", "92.58 (91.94)", "93.98 (93.98)"),
    ("random", "MoCo-v3", "CPIA", "91.03 (85.70)", "73.14 (68.05)", "81.02 (80.76)"),
    ("random", "DINO", "CPIA", "91.24 (85.31)", "70.32 (62.83)", "80.09 (79.94)"),
    ("ImageNet", "MAE", "CPIA", "97.35 (95.66)", "92.23 (91.82)", "91.67 (91.65)"),
    ("ImageNet", "MAE", "CPIA-L", "97.33 (95.73)", "89.40 (88.60)", "92.59 (92.58)"),
    ("ImageNet", "MAE", "CPIA-M", "97.14 (95.12)", "89.75 (89.04)", "92.59 (92.59)"),
    ("ImageNet", "MAE", "CPIA-S", "97.49 (95.57)", "84.45 (83.28)", "92.13 (92.13)"),
)
"""The paper's Table II: init, method, data, accuracy % (F1 %) per task."""

NO_EXCLUSIONS = " (no exclusions)"
"""Appended to the data of a row pre-trained on an export that kept the evaluation data."""


FROZEN = (("knn", "kNN"), ("linear_probe", "linear"))
"""Frozen-encoder scores shown after fine-tuning's: the result key and its label."""


def table_ii_caption(max_distance: int) -> str:
    return (
        "Cells: test accuracy % (macro F1 %) of fine-tuning at the epoch with the best validation "
        "accuracy, then of kNN (k=20) and a linear probe on the frozen encoder; "
        "n: test images; leaks: val/test images with a near-duplicate (perceptual hash within "
        f"{max_distance} bits) in the data the encoder was pre-trained on (n/a: not pre-trained "
        "here), ! where the data did not hold out the task's sources. Paper rows: as published."
    )


def _scores(scores: dict[str, Any]) -> str:
    return f"{100 * scores['accuracy']:.2f} ({100 * scores['macro_f1']:.2f})"


def _cell(row: dict[str, Any]) -> str:
    leaks = "n/a" if row["leaks"] is None else str(row["leaks"])
    flag = " !" if row["sources_not_held_out"] else ""
    frozen = "".join(f" · {label} {_scores(row[key])}" for key, label in FROZEN if key in row)
    return f"{_scores(row)}{frozen} · n={row['images']['test']} · leaks {leaks}{flag}"


def table_ii_markdown(rows: Sequence[dict[str, Any]], max_distance: int) -> str:
    """Our results (`rows`: evaluate_all rows) as Table II, followed by the paper's rows."""
    ours: dict[tuple[str, str, str], dict[str, str]] = {}
    for row in rows:
        data = row["data"] + ("" if row["exclusions_applied"] else NO_EXCLUSIONS)
        ours.setdefault((row["init"], row["method"], data), {})[row["task"]] = _cell(row)
    tasks = sorted({row["task"] for row in rows})
    tasks += [task for task in PAPER_TASKS if task not in tasks]
    lines = [table_ii_caption(max_distance), "",
             "| source | init | method | data | " + " | ".join(tasks) + " |",
             "|---" * (4 + len(tasks)) + "|"]  # fmt: skip
    entries = [("ours", *key, cells) for key, cells in sorted(ours.items())]
    entries += [("paper", *row[:3], dict(zip(PAPER_TASKS, row[3:], strict=True)))
                for row in PUBLISHED_TABLE_II]  # fmt: skip
    for source, init, method, data, cells in entries:
        values = " | ".join(cells.get(task, "") for task in tasks)
        lines.append(f"| {source} | {init} | {method} | {data} | {values} |")
    return "\n".join(lines)


def confusion_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """Each result's test confusion matrix as a markdown table (rows: true class)."""
    parts = []
    for row in rows:
        header = "| true \\ predicted | " + " | ".join(row["classes"]) + " |"
        lines = [header, "|---" * (len(row["classes"]) + 1) + "|"]
        lines += [
            f"| {name} | " + " | ".join(map(str, counts)) + " |"
            for name, counts in zip(row["classes"], row["confusion"], strict=True)
        ]
        title = f"**{row['task']}: {row['init']} / {row['method']} / {row['data']}**"
        detail = f" (test, n={row['images']['test']}; best epoch {row['best_epoch']} on validation)"
        parts.append(title + detail + "\n\n" + "\n".join(lines))
    return "\n\n".join(parts)

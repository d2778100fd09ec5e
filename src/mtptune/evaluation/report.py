"""Evaluation reports: JSON + CSV + a PNG plot in an output folder, a terminal table, and side-by-side compare.

Folder layout: `result.json` (the evaluated head), `baseline.json` (the "before" head, when given),
`acceptance.csv` (one line per result and position), `acceptance.png` (per-position acceptance, before vs
after; training curves from the run's metrics jsonl when given).
"""

from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

from mtptune.errors import DataError
from mtptune.evaluation.result import RESULT_FILE, EvaluationResult

BASELINE_FILE = "baseline.json"
CSV_FILE = "acceptance.csv"
PLOT_FILE = "acceptance.png"
# Plotted when present (train/ and val/); everything else only when none of these exist.
HEADLINE_CURVES = ("loss", "tau_sim", "acceptance_length")


@dataclass(frozen=True)
class ReportFiles:
    result: Path
    csv: Path
    plot: Path | None
    baseline: Path | None = None


def format_table(results: list[tuple[str, EvaluationResult]]) -> str:
    """Columns = results; rows = AL, p_k, c_k and whatever each method measured."""
    k = max(r.num_steps for _, r in results)

    def cell(v: float | int | str | None, fmt: str = ".3f") -> str:
        if v is None:
            return "-"
        return format(v, fmt) if isinstance(v, float) else str(v)

    def at(values: list[float] | None, i: int) -> float | None:
        return values[i] if values is not None and i < len(values) else None

    lines: list[tuple[str, list[str]]] = [
        ("method", [r.method for _, r in results]),
        ("data", [r.dataset for _, r in results]),
        ("K", [str(r.num_steps) for _, r in results]),
        ("drafts", [str(r.counts.drafts) for _, r in results]),
        ("acceptance length", [cell(r.acceptance_length) for _, r in results]),
        ("draft acceptance rate", [cell(r.draft_acceptance_rate) for _, r in results]),
    ]
    lines += [(f"p_{i} (unconditional)", [cell(at(r.counts.unconditional, i)) for _, r in results]) for i in range(k)]
    lines += [(f"c_{i} (conditional)", [cell(at(r.counts.conditional, i)) for _, r in results]) for i in range(k)]
    if any(r.label_accuracy for _, r in results):
        lines += [(f"label acc step {i}", [cell(at(r.label_accuracy, i)) for _, r in results]) for i in range(k)]
    if any(r.generation for _, r in results):
        g = [r.generation for _, r in results]
        lines += [
            ("generated tokens", [cell(x.generated_tokens if x else None) for x in g]),
            ("verifier steps", [cell(x.verifier_steps if x else None) for x in g]),
            ("greedy verifier steps", [cell(x.baseline_verifier_steps if x else None) for x in g]),
            ("tokens/s speculative", [cell(x.tokens_per_s if x else None, ".1f") for x in g]),
            ("tokens/s greedy", [cell(x.baseline_tokens_per_s if x else None, ".1f") for x in g]),
            ("lossless checked", [cell(("yes" if x.lossless_checked else "no") if x else None) for x in g]),
            ("numerical ties", [cell(x.numerical_ties if x else None) for x in g]),
            ("temperature", [cell(x.temperature if x else None, "g") for x in g]),
        ]
    turns = max((len(r.by_turn or []) for _, r in results), default=0)
    for t in range(turns):
        turn = [r.by_turn[t] if r.by_turn and t < len(r.by_turn) else None for _, r in results]
        lines.append((f"AL turn {t + 1}", [cell(c.acceptance_length if c else None) for c in turn]))
        lines.append((f"drafts turn {t + 1}", [cell(c.drafts if c else None) for c in turn]))
    header = ("", [label for label, _ in results])
    rows = [header, *lines]
    w0 = max(len(name) for name, _ in rows)
    widths = [max(len(row[1][j]) for row in rows) for j in range(len(results))]
    out = []
    for n, (name, cells) in enumerate(rows):
        out.append("  ".join([name.ljust(w0), *(c.rjust(w) for c, w in zip(cells, widths))]))
        if n == 0:
            out.append("-" * len(out[0]))
    return "\n".join(out)


def write_csv(path: Path, results: list[tuple[str, EvaluationResult]]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["label", "method", "head", "position", "p", "conditional", "accepted", "drafts", "acceptance_length"]
        )
        for label, r in results:
            c = r.counts
            for k in range(c.num_steps):
                writer.writerow(
                    [
                        label,
                        r.method,
                        r.head,
                        k,
                        f"{c.unconditional[k]:.6f}",
                        f"{c.conditional[k]:.6f}",
                        c.accepted_per_position[k],
                        c.drafts,
                        f"{c.acceptance_length:.6f}",
                    ]
                )
    return path


def read_training_curves(path: str | Path) -> dict[str, list[tuple[float, float]]]:
    """Numeric series from a run's metrics jsonl (a file, or the first `*.jsonl` under a run folder), keyed by
    metric name, x = `global_step` / `step` / line number."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.jsonl")) or sorted(path.rglob("*metrics*.jsonl"))
        if not files:
            raise DataError(f"{path}: no metrics *.jsonl found for the training curves.")
        path = files[0]
    series: dict[str, list[tuple[float, float]]] = {}
    broken: list[int] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                broken.append(lineno)  # a run killed mid-write leaves one partial line; its resume goes on below
                continue
            x = row.get("global_step", row.get("step", lineno))
            split = row.get("split")  # the trainer logs {"split": "train" | "val", "step": ..., metrics}
            prefix = f"{split}/" if isinstance(split, str) else ""
            for key, value in row.items():
                if key in ("global_step", "step", "epoch", "time", "timestamp") or isinstance(value, bool):
                    continue
                if isinstance(value, (int, float)) and math.isfinite(value):
                    series.setdefault(prefix + key, []).append((float(x), float(value)))
    if broken:
        logging.getLogger(__name__).warning(
            "%s: skipped %d line(s) that are not valid JSON (a killed run's partial write?): line %s",
            path,
            len(broken),
            ", ".join(map(str, broken[:5])),
        )
    if not series and broken:
        raise DataError(f"{path}: no valid metrics line (first invalid: line {broken[0]}).")
    return series


def plot(
    path: Path, results: list[tuple[str, EvaluationResult]], curves: dict[str, list[tuple[float, float]]] | None
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = 2 if curves else 1
    fig, axes = plt.subplots(1, ncols, figsize=(6 * ncols, 4), squeeze=False)
    ax = axes[0][0]
    k = max(r.num_steps for _, r in results)
    width = 0.8 / len(results)
    for j, (label, r) in enumerate(results):
        xs = [i + (j - (len(results) - 1) / 2) * width for i in range(r.num_steps)]
        ax.bar(xs, r.counts.unconditional, width, label=f"{label} (AL {r.acceptance_length:.2f})")
    ax.set_xticks(range(k), [f"pos {i}" for i in range(k)])
    ax.set_ylim(0, 1)
    ax.set_ylabel("unconditional acceptance p_k")
    ax.set_title("Per-position acceptance")
    ax.legend()
    if curves:
        # Losses on the left axis; acceptance-like curves (tau_sim, acc, p_k) on the right.
        ax = axes[0][1]
        right = ax.twinx()
        headline = {n: p for n, p in curves.items() if n.rsplit("/", 1)[-1] in HEADLINE_CURVES}
        for color, (name, points) in enumerate(sorted((headline or curves).items())):
            xs, ys = [p[0] for p in points], [p[1] for p in points]
            style = {"color": f"C{color % 10}", "label": name, "marker": "o" if len(points) < 12 else None}
            if "loss" in name:
                ax.plot(xs, ys, **style)
            elif "tau" in name or "acc" in name:
                right.plot(xs, ys, linestyle="--", **style)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        right.set_ylabel("acceptance")
        ax.set_title("Training curves")
        handles = ax.get_legend_handles_labels()
        more = right.get_legend_handles_labels()
        if handles[0] or more[0]:
            ax.legend(handles[0] + more[0], handles[1] + more[1], fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(
    out_dir: str | Path,
    result: EvaluationResult,
    baseline: EvaluationResult | None = None,
    training_metrics: str | Path | None = None,
    make_plot: bool = True,
) -> ReportFiles:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    labelled = labelled_results(result, baseline)
    result_path = result.save(out_dir / RESULT_FILE)
    baseline_path = baseline.save(out_dir / BASELINE_FILE) if baseline is not None else None
    csv_path = write_csv(out_dir / CSV_FILE, labelled)
    plot_path = None
    if make_plot:
        curves = read_training_curves(training_metrics) if training_metrics else None
        plot_path = plot(out_dir / PLOT_FILE, labelled, curves)
    return ReportFiles(result_path, csv_path, plot_path, baseline_path)


def labelled_results(result: EvaluationResult, baseline: EvaluationResult | None) -> list[tuple[str, EvaluationResult]]:
    return [("before", baseline), ("after", result)] if baseline is not None else [("result", result)]

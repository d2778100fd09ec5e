"""Collect every experiment under <work-dir>/exp/*/results.json into one markdown table and one small plot.

python examples/smollm2_gsm8k/summarize.py --work-dir runs/cpu --plot docs/results.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def load(work: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted((work / "exp").glob("*/results.json"))}


def cell(results: dict, label: str, key: str) -> str:
    entry = results.get(label, {}).get(key)
    if entry is None or "per_position" not in entry:  # not run, skipped (time budget) or failed
        return "—" if entry is None else next(iter(entry))
    p = " / ".join(f"{x:.2f}" for x in entry["per_position"])
    return f"{entry['acceptance_length']:.2f} ({p})"


def table(runs: dict[str, dict]) -> str:
    keys = ("offline_gsm8k", "generate_gsm8k", "generate_mt_bench")
    lines = [
        "| experiment | state | held-out GSM8K offline tau_sim (p_k) | held-out GSM8K generate AL (p_k) | MT-Bench generate AL (p_k) |",
        "|---|---|---|---|---|",
    ]
    for name, results in runs.items():
        for label in ("untrained", "trained"):
            lines.append(f"| {name} | {label} | " + " | ".join(cell(results, label, k) for k in keys) + " |")
    return "\n".join(lines)


def plot(runs: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))

    def al(name: str, label: str) -> float:  # 1.0 (accepts nothing) where the run skipped the untrained head
        return runs[name].get(label, {}).get("offline_gsm8k", {}).get("acceptance_length", 1.0)

    names = list(runs)
    base = [al(n, "untrained") for n in names]
    trained = [al(n, "trained") for n in names]
    x = range(len(names))
    axes[0].bar([i - 0.2 for i in x], base, 0.4, label="untrained")
    axes[0].bar([i + 0.2 for i in x], trained, 0.4, label="trained")
    axes[0].set_xticks(list(x), names, rotation=30, ha="right", fontsize=7)
    axes[0].set_ylabel("held-out GSM8K tau_sim (K=3)")
    axes[0].axhline(2.5, color="grey", ls=":", lw=1)
    axes[0].legend(fontsize=7)
    for name, results in runs.items():
        ks = sorted(int(k.rsplit("_k", 1)[1]) for k in results.get("trained", {}) if k.startswith("offline_gsm8k_k"))
        if not ks:
            continue
        k3 = results["config"]["num_steps"]
        ks = sorted({*ks, k3})
        al = [
            results["trained"]["offline_gsm8k" if k == k3 else f"offline_gsm8k_k{k}"]["acceptance_length"] for k in ks
        ]
        axes[1].plot(ks, al, "o-", label=name)
    axes[1].set_xlabel("K (drafted tokens)")
    axes[1].set_ylabel("held-out GSM8K tau_sim")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", required=True)
    p.add_argument("--plot", default=None)
    args = p.parse_args()
    runs = load(Path(args.work_dir))
    print(table(runs))
    if args.plot:
        plot(runs, Path(args.plot))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

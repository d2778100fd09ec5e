"""One results row per run (run.py appends it to <work-dir>/results_rows.jsonl, replacing an older row of the same
experiment) and the markdown tables of docs/results.md built from such rows:

* every figure: per-position acceptance p_k, conditional acceptance and AL of the trained head, with how many
  prompts / drafts it rests on, the untrained (fresh) head's AL beside it, and MT-Bench's turns 1 / 2 apart;
* the levers: one line per run with its data (size, mix), epochs, loss, K during training, lr and headline ALs;
* the validation tau_sim curve of each run (per epoch), and with --plot a PNG of those curves.

A sweep is a loop over run.py flags with one --work-dir (regenerated answers and hidden states are shared); then
  python examples/smollm2_gsm8k/results_table.py RUNS/results_rows.jsonl [more.jsonl ...] [--plot curves.png]
prints the tables. A figure that was not measured shows "—"; one cut short by the time budget shows its prompts.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

FIGURES = (
    ("offline_gsm8k", "GSM8K held-out, offline tau_sim"),
    ("generate_gsm8k", "GSM8K held-out, T=0 (lossless check)"),
    ("generate_gsm8k_T0.7", "GSM8K held-out, T=0.7 (rejection sampling)"),
    ("generate_mt_bench", "MT-Bench, T=0 (lossless check)"),
    ("generate_mt_bench_T0.7", "MT-Bench, T=0.7 (rejection sampling)"),
)
LEVERS = (
    "train_questions", "answers_per_question", "chat_samples", "chat_max_turns", "max_rows", "epochs", "loss",
    "train_num_steps", "num_steps", "lr", "init", "total_seq_len", "max_tokens", "eval_max_tokens", "mtbench_turns",
)  # fmt: skip


def _compact(entry: dict) -> dict:
    if "per_position" not in entry:  # failed or skipped: keep why
        return {k: v for k, v in entry.items() if k in ("error", "skipped")}
    out = {
        "acceptance_length": entry["acceptance_length"],
        "per_position": entry["per_position"],
        "conditional": entry.get("conditional"),
        "drafts": entry.get("drafts"),
    }
    generation = entry.get("generation") or {}
    for key in ("prompts", "conversations", "temperature", "numerical_ties", "speedup", "max_new_tokens"):
        if generation.get(key) is not None:
            out[key] = generation[key]
    if entry.get("by_turn"):
        out["by_turn"] = [{"acceptance_length": t["acceptance_length"], "drafts": t["drafts"]} for t in entry["by_turn"]]  # fmt: skip
    return out


def row(results: dict, args: argparse.Namespace) -> dict:
    """The row of one run: its levers, data, every figure of the trained and the fresh head, the validation curve."""
    config = vars(args)
    levers = {k: config.get(k) for k in LEVERS}
    levers["train_questions"] = (results.get("data") or {}).get("train_questions")
    figures = {
        head: {k: _compact(v) for k, v in results.get(label, {}).items() if not k.startswith("offline_gsm8k_k")}
        for head, label in (("trained", "trained"), ("fresh", "untrained"))
    }
    training = results.get("training") or {}
    return {
        "name": results.get("name"),
        "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        "status": results.get("status"),
        "stages": results.get("stages_asked"),
        "levers": levers,
        "data": results.get("data"),
        "figures": figures,
        "validation": [
            {k: c[k] for k in ("epoch", "step", "tau_sim", "loss") if k in c} for c in training.get("validation", [])
        ],
        "stopped_by_budget": bool(training.get("stopped_by_budget")),
        "seconds": {s["stage"]: s.get("seconds") for s in results.get("stages", [])},
    }


def read_rows(paths: list[Path]) -> list[dict]:
    rows: dict[str, dict] = {}
    for path in paths:
        for line in path.read_text().split("\n"):
            if line.strip():
                r = json.loads(line)
                rows[r["name"]] = r  # a later row of the same run replaces the earlier one
    return list(rows.values())


def write_row(path: Path, new: dict) -> None:
    """Add `new` to the rows file, replacing an older row of the same run (atomic rewrite)."""
    rows = [r for r in (read_rows([path]) if path.is_file() else []) if r["name"] != new["name"]] + [new]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


def _al(entry: dict | None) -> str:
    if not entry:
        return "—"
    if "acceptance_length" not in entry:
        return "skipped" if "skipped" in entry else "failed"
    return f"{entry['acceptance_length']:.2f}"


def _count(entry: dict) -> str:
    drafts = f"{entry.get('drafts', 0):,} drafts"
    if "prompts" not in entry:  # offline: every slot of the held-out answers drafts
        return drafts
    if entry.get("conversations") and entry["conversations"] != entry["prompts"]:
        return f"{entry['prompts']} turns of {entry['conversations']} conversations, {drafts}"
    return f"{entry['prompts']} prompts, {drafts}"


def figures_table(rows: list[dict]) -> str:
    lines = [
        "| run | figure | measured on | AL | p_0 / p_1 / p_2 | conditional | fresh head AL | turn 1 / turn 2 AL |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        for key, title in FIGURES:
            entry = r["figures"].get("trained", {}).get(key)
            if entry is None:
                continue
            fresh = r["figures"].get("fresh", {}).get(key)
            if "acceptance_length" not in entry:
                lines.append(f"| {r['name']} | {title} | — | {_al(entry)} | | | {_al(fresh)} | |")
                continue
            p = " / ".join(f"{x:.3f}" for x in entry["per_position"])
            c = " / ".join(f"{x:.3f}" for x in entry.get("conditional") or [])
            turns = " / ".join(f"{t['acceptance_length']:.2f}" for t in entry.get("by_turn") or [])
            lines.append(
                f"| {r['name']} | {title} | {_count(entry)} | "
                f"**{entry['acceptance_length']:.2f}** | {p} | {c} | {_al(fresh)} | {turns} |"
            )
    return "\n".join(lines)


def levers_table(rows: list[dict]) -> str:
    heads = [title.split(" (")[0] for _, title in FIGURES]
    lines = [
        "| run | data | epochs | loss | K train | lr | " + " | ".join(heads) + " |",
        "|---|---|---|---|---|---|" + "---|" * len(FIGURES),
    ]
    for r in rows:
        lv, data = r["levers"], r.get("data") or {}
        mix = f"{lv.get('train_questions')} GSM8K q × {lv.get('answers_per_question')}"
        if lv.get("chat_samples"):
            mix += (
                f" + {data.get('chat_conversations', lv['chat_samples'])} ShareGPT × ≤{lv.get('chat_max_turns')} turns"
            )
        mix += f"; {data.get('train_rows', '?')} rows"
        if data.get("supervised_tokens"):
            mix += f", {data['supervised_tokens']:,} supervised tokens"
        if lv.get("max_rows"):
            mix += f" (first {lv['max_rows']} rows)"
        als = [_al(r["figures"].get("trained", {}).get(key)) for key, _ in FIGURES]
        lines.append(
            f"| {r['name']} | {mix} | {lv.get('epochs')} | {lv.get('loss')} | {lv.get('train_num_steps')} | "
            f"{lv.get('lr')} | " + " | ".join(als) + " |"
        )
    return "\n".join(lines)


def curves(rows: list[dict]) -> str:
    out = []
    for r in rows:
        taus = [f"{c['tau_sim']:.2f}" for c in r.get("validation", []) if "tau_sim" in c]
        cut = " (stopped by the time budget)" if r.get("stopped_by_budget") else ""
        out.append(f"* {r['name']}: validation tau_sim {', '.join(taus) or '—'}{cut}")
    return "\n".join(out)


def plot_curves(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for r in rows:
        taus = [c["tau_sim"] for c in r.get("validation", []) if "tau_sim" in c]
        if taus:
            ax.plot(range(len(taus)), taus, "o-", label=r["name"])
    ax.set_xlabel("validation pass (0 = before training, when run)")
    ax.set_ylabel("validation tau_sim (K=3)")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("rows", nargs="+", help="results_rows.jsonl file(s); a later row of the same run wins")
    p.add_argument("--plot", default=None, help="also write the validation tau_sim curves here (PNG)")
    args = p.parse_args()
    rows = read_rows([Path(x) for x in args.rows])
    print(figures_table(rows), levers_table(rows), curves(rows), sep="\n\n")
    if args.plot:
        plot_curves(rows, Path(args.plot))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

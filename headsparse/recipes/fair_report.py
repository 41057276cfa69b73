"""The fair test's report: composition, settings, per-arm results, seeds, verdict (markdown), the plot, the files.

Pure rendering of the dict :func:`headsparse.recipes.experiment.run_arms` returns; no training here.
"""
from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Optional

from .._atomic import atomic_write_text
from . import _cost_plot
from .stats import seed_interval
from .verdict import why


def _ci(d: Optional[Dict], signed: bool = False) -> str:
    if not d:
        return "-"
    f = "{:+.3f}" if signed else "{:.3f}"
    return f"{f.format(d['estimate'])} [{f.format(d['low'])}, {f.format(d['high'])}]"


def _num(v, nd: int = 1) -> str:
    if v is None:
        return "-"
    return "inf" if isinstance(v, float) and math.isinf(v) else f"{v:.{nd}f}"


def _load(v) -> str:
    return "/".join(f"{x:.1f}" for x in v) if v else "-"


def composition_table(comp: Dict) -> str:
    lines = ["| task | records | share of the pool |", "| --- | --- | --- |"]
    n = comp["pool"]
    for task, k in sorted(comp["records"].items(), key=lambda kv: -kv[1]):
        mark = " (target)" if task == comp.get("target_task") else ""
        lines.append(f"| {task}{mark} | {k} | {k / n:.1%} |")
    lines.append(f"| **pool** | **{n}** | target share {comp['target_share']:.1%}; mining recall ceiling at "
                 f"{comp.get('fraction', 0.1):.0%}: **{comp['recall_ceiling']:.2f}** |")
    return "\n".join(lines)


def settings_table(report: Dict) -> str:
    lines = ["| arm | epochs | lr | source | search s (besides the chosen training) | dev Q per candidate |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, s in report["settings"].items():
        tried = ", ".join(f"{t['epochs']}ep@{t['lr']:g}: {t['dev_q']:.3f}" for t in s.get("tried", [])) or "-"
        lines.append(f"| {name} | {s['epochs']} | {s['lr']:g} | {s.get('source', '-')} | "
                     f"{_num(s.get('search_s'))} | {tried} |")
    return "\n".join(lines)


def _search_s(report: Dict, arm: str) -> float:
    return report["settings"].get(arm, {}).get("search_s") or 0.0


def _cpu_speedup(r: Dict, cpu_full: Optional[float]) -> str:
    cpu = r.get("cpu_select", 0.0) + r.get("cpu_train", 0.0)
    return f"{cpu_full / cpu:.2f}x" if cpu_full and cpu > 0 else "-"


def results_table(report: Dict) -> str:
    full = next((r for r in report["rows"] if r["data_kind"] == "pool" and r["train"] == "full"), None)
    t_full_s = full["t_train"] + _search_s(report, full["arm"]) if full else None
    cpu_full = full.get("cpu_train") if full else None
    head = ("| arm | seed | data | trained params | steps (epochs @ lr) | Q [95% CI] | Q - Q_base [95% CI] | "
            "Q - Q_full [95% CI] | mining P/R | T_select s | T_train s | speedup | speedup incl. search | "
            "speedup (CPU time) | dev Q |")
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for r in report["rows"]:
        pr = f"{r['mining_precision']:.2f}/{r['mining_recall']:.2f}" if "mining_precision" in r else "-"
        st = f"{r['steps']} ({r['epochs']} @ {r['lr']:g})" if r.get("lr") else "-"
        cost = r["t_select"] + r["t_train"]
        sp_s = (t_full_s / (cost + _search_s(report, r["arm"])) if t_full_s and cost > 0 else None)
        lines.append(f"| {r['arm']} | {r['seed']} | {r['data']} | {r['trained']['trainable_params']:,} | {st} | "
                     f"{_ci(r['q_ci'])} | {_ci(r['vs_base'], True)} | {_ci(r.get('vs_full'), True)} | {pr} | "
                     f"{r['t_select']:.1f} | {r['t_train']:.1f} | "
                     f"{_num(r.get('speedup'), 2) + 'x' if r.get('speedup') else '-'} | "
                     f"{_num(sp_s, 2) + 'x' if sp_s else '-'} | {_cpu_speedup(r, cpu_full)} | "
                     f"{_num(r.get('q_dev'), 3)} |")
    return "\n".join(lines)


def seed_table(report: Dict) -> str:
    by: Dict[str, List[Dict]] = {}
    for r in report["rows"]:
        by.setdefault(r["arm"], []).append(r)
    lines = ["| arm | seeds | mean Q [95% t-interval across seeds] | mean T_select + T_train s |",
             "| --- | --- | --- | --- |"]
    for arm, rs in by.items():
        if len(rs) > 1:
            q = seed_interval([r["q"] for r in rs]).as_dict()
            lines.append(f"| {arm} | {len(rs)} | {_ci(q)} | "
                         f"{sum(r['t_select'] + r['t_train'] for r in rs) / len(rs):.1f} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def markdown(report: Dict) -> str:
    env, task, comp = report["environment"], report["task"], report["composition"]
    ls, le = env.get("load_average_start"), env.get("load_average_end")
    out = [f"# headsparse run, the fair test: {task['name']}", "",
           f"**1/5/15-min load average at the start {_load(ls)}, at the end {_load(le)}** "
           f"(on {env['device']}; wall times from a loaded machine are not the method's cost: compare CPU seconds "
           f"in the JSON, or rerun on a quiet machine). Run wall time {report['wall_s'] / 60:.1f} min.", "",
           f"{env['date_utc']}, {env['torch_threads']} torch threads, Python {env['python']}, torch {env['torch']}, "
           f"transformers {env['transformers']}, headsparse {env['headsparse']}, commit {env['commit']}.", "",
           *([f"Rendered again from this run's JSON at commit {report['rendered']['commit']} "
              f"({report['rendered']['why']}); every number is the run's.", ""] if report.get("rendered") else []),
           task["description"], "",
           f"Target set {task['target_set']} (head scoring, P2D's prototypes), dev {task['dev']} (every choice), "
           f"held-out eval {task['eval']} (every arm, the same items). Head scorer: {report.get('head_scorer')}.",
           "", "## Pool composition", "", composition_table(comp), "",
           "## Epochs and learning rates (chosen on dev)", "",
           settings_table(report), "",
           "An arm whose source is not a search on this pool's dev split was not tuned for it; the verdict then "
           "rests on settings carried over and says less.", "",
           "## Results", "",
           "Q: accuracy on the held-out items (multiple choice by log-likelihood), 95% percentile bootstrap CI over "
           "the items; differences paired over the same items. T_select = head scoring (when the arm uses the "
           "scored heads, to train or to mine) + mining; speedup = T_full / (T_select + T_train) against full "
           "fine-tuning on the whole pool; 'incl. search' adds each arm's search cost to both sides; 'CPU time' is the same "
           "ratio from process CPU seconds (all threads), which other jobs on the machine inflate less. 'dev Q' is the "
           "trained model's dev accuracy, measured when the run searched (with settings given, the search's dev Q "
           "per candidate is in the table above).", "",
           results_table(report), ""]
    st = seed_table(report)
    if st:
        out += ["Across seeds (seed k > 0 scores heads on a bootstrap resample of the target set, draws random heads "
                "and data with seed k):", "", st, ""]
    out += ["## Verdict", "", "Rules fixed before the run (headsparse/recipes/verdict.py): R1 P2D non-inferior to "
            "full fine-tuning on the whole pool (paired 95% CI lower bound above -0.02, every seed); R2 P2D's data "
            "against a random 10% with the same heads and R3 scored against random heads on the same data (paired "
            "CIs per seed); R4 P2D against LoRA r16 on the mined data at its cost; R5 end-to-end speedup with "
            "selection, without and with searches. The claim holds when R1 and R5 hold.", "",
            report["verdict"]["text"], ""]
    # reports written before the diagnostics existed: read them from the same per-item outcomes now
    w = report["verdict"].get("why") or why(report, report.get("config", {}).get("n_boot", 2000),
                                            report.get("config", {}).get("seed", 0))
    out += [w["text"], ""]
    unsearched = [n for n, st in report["settings"].items() if st.get("search_s") is None]
    if unsearched:
        out += [f"**Caveat: the epochs and learning rates of {len(unsearched)} arm(s) were not chosen on this pool's "
                f"dev split** ({', '.join(unsearched)}); the verdict compares arms whose settings may favour some of "
                f"them. Run `headsparse run --search` (or pass `--settings-from` a search's report) for the verdict "
                f"the rules intend.", ""]
    out += ["Stage wall times (s): " + ", ".join(f"{k} {v:.1f}" for k, v in report["stages_s"].items()), ""]
    return "\n".join(out)


def plot(report: Dict, path: str) -> Optional[str]:
    """Held-out quality (95% CI) against cost (share of full fine-tuning's time) for every arm and seed; base line."""
    plt = _cost_plot.pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors: Dict[str, str] = {}
    for r in report["rows"]:
        if r["train"] == "none":
            _cost_plot.base_band(ax, r["q"], r["q_ci"], f"{r['arm']} {r['q']:.3f}")
            continue
        first = r["arm"] not in colors
        h = _cost_plot.point(ax, r.get("cost_ratio", 1.0), r["q"], r["q_ci"], capsize=3, color=colors.get(r["arm"]),
                             label=r["arm"] if first else None)
        colors.setdefault(r["arm"], h[0].get_color())
    return _cost_plot.save(plt, fig, ax, f"{report['task']['name']}: verdict, the claim {report['verdict']['claim']}",
                           path)


def write_report(report: Dict, out_dir: str, stem: str) -> Dict[str, str]:
    """``<stem>.json``, ``<stem>.md`` and (with matplotlib) ``<stem>.png`` in ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, f"{stem}.json"), "md": os.path.join(out_dir, f"{stem}.md")}
    atomic_write_text(paths["json"], json.dumps(report, indent=1, default=str))
    atomic_write_text(paths["md"], markdown(report))
    png = plot(report, os.path.join(out_dir, f"{stem}.png"))
    if png:
        paths["png"] = png
    return paths

"""Report of the pipeline design (``headsparse run --design pipeline``): results table, learning-rate search,
paired comparisons, markdown, plot, files. Pure rendering of the dict
:func:`headsparse.recipes.pipeline.run_pipeline` returns (the fair test's report is
:mod:`headsparse.recipes.fair_report`)."""
from __future__ import annotations

import json
import math
import os
from typing import Dict, Optional

from .._atomic import atomic_write_text
from . import _cost_plot
from .stats import mcnemar_p, paired_bootstrap_ci


def _prefix_cache_note(report: Dict) -> str:
    """A sentence naming the head arms that trained with the frozen-prefix cache (none: empty)."""
    arms = [r["method"] for r in report.get("rows", ()) if r.get("prefix_cache")]
    if not arms:
        return ""
    return (f" Head arms trained with the frozen-prefix cache (layers below the gradient horizon run once per "
            f"example, in eval mode, and later epochs start from their stored output; same losses as without it): "
            f"{', '.join(arms)}.")


def _fmt(v, nd=3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "undefined"
        return "inf" if math.isinf(v) else f"{v:.{nd}f}"
    return str(v)


def _ci(d: Optional[Dict], nd: int = 3, signed: bool = False) -> str:
    if not d:
        return "-"
    f = f"{{:+.{nd}f}}" if signed else f"{{:.{nd}f}}"
    return f"{f.format(d['estimate'])} [{f.format(d['low'])}, {f.format(d['high'])}]"


def _p(v) -> str:
    return "-" if v is None else (f"{v:.3f}" if v >= 0.001 else f"{v:.1e}")


def _trained(t: Dict) -> str:
    if t["other_modules"] == "all":
        return f"all ({t['trainable_params']:,} params)"
    if not t["query_heads"]:
        return "nothing"
    s = (f"{t['query_heads']}/{t['total_query_heads']} q heads, {t['kv_heads']}/{t['total_kv_heads']} kv heads, "
         f"{t['trainable_params']:,} params")
    return s + (f", {t['pruned_query_heads']} pruned" if "pruned_query_heads" in t else "")


def _steps(r: Dict) -> str:
    return f"{r['steps']} @ {r['lr']:g}" if r.get("lr") else "-"


def lr_search_table(report: Dict) -> str:
    """Per arm: the learning rates tried, each one's dev quality, the choice and the search's cost (markdown)."""
    searches = report.get("lr_search") or {}
    if not searches:
        return ""
    lines = ["| arm | source | lr: dev Q (steps) | chosen lr | search s (besides the chosen training) |",
             "| --- | --- | --- | --- | --- |"]
    for key, e in searches.items():
        tried = ", ".join(f"{t['lr']:g}: {t['dev_q']:.3f} ({t['steps']})" for t in e.get("tried", [])) or "-"
        lines.append(f"| {key} | {e.get('source', '-')} | {tried} | {e['lr']:g} | {_fmt(e.get('search_s'), 1)} |")
    return "\n".join(lines)


def table(report: Dict) -> str:
    """The results table (markdown) of a report: quality with CIs, paired comparisons, cost, AER."""
    head = ("| arm | data | trained | Q [95% CI] | Q - Q_base [95% CI] | McNemar p vs base | Q - Q_full [95% CI] "
            "| McNemar p vs full | answer NLL | gain recovered | T_select s | T_train s | cost ratio | speedup | AER "
            "| AER (old, Q/Q_full) | mining P/R | steps @ lr | dev Q |")
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for r in report["rows"]:
        pr = (f"{r['mining_precision']:.2f}/{r['mining_recall']:.2f}" if "mining_precision" in r else "-")
        lines.append(
            f"| {r['method']} | {r['data']} | {_trained(r['trained'])} | {_ci(r['q_ci'])} | "
            f"{_ci(r['vs_base'], signed=True)} | {_p(r['vs_base_mcnemar_p'])} | {_ci(r.get('vs_full'), signed=True)} | "
            f"{_p(r.get('vs_full_mcnemar_p'))} | {_fmt(r['answer_nll'])} | {_fmt(r['gain_recovered'])} | "
            f"{_fmt(r['t_select'], 1)} | {_fmt(r['t_train'], 1)} | {_fmt(r['cost_ratio'])} | "
            f"{'-' if math.isinf(r['speedup']) else _fmt(r['speedup'], 2) + 'x'} | {_fmt(r['aer'])} | "
            f"{_fmt(r['aer_quality_ratio'])} | {pr} | {_steps(r)} | {_fmt(r.get('q_dev'))} |")
    return "\n".join(lines)


def pairwise(report: Dict) -> str:
    """Paired differences between the tuned arms (markdown), from the per-item outcomes in the report."""
    arms = [r for r in report["rows"] if r["method"] not in ("full",) and not r["method"].startswith("base")]
    n, seed = report["config"]["n_boot"], report["config"]["seed"]
    lines = ["| arm A | arm B | Q_A - Q_B [95% CI] | McNemar p |", "| --- | --- | --- | --- |"]
    for i, a in enumerate(arms):
        for b in arms[i + 1:]:
            d = paired_bootstrap_ci(a["correct"], b["correct"], n_boot=n, seed=seed).as_dict()
            lines.append(f"| {a['method']} | {b['method']} | {_ci(d, signed=True)} | "
                         f"{_p(mcnemar_p(a['correct'], b['correct']))} |")
    return "\n".join(lines) if len(arms) > 1 else ""


def markdown(report: Dict) -> str:
    env, task, cfg = report["environment"], report["task"], report["config"]
    out = [f"# headsparse run: {task['name']}", "",
           f"{env['date_utc']}, {env['device']} ({env['torch_threads']} torch threads, "
           f"1/5/15-min load average at the start {_load(env, 'start')} and at the end {_load(env, 'end')}), "
           f"Python {env['python']}, torch {env['torch']}, "
           f"transformers {env['transformers']}, headsparse {env['headsparse']}, commit {env['commit']}.", "",
           task["description"], "",
           f"Pool {task['pool']} examples ({_fmt(task['pool_targets'])} of the target task), target set "
           f"{task['target_set']}, dev {task['dev']}, held-out eval {task['eval']}. Config: {json.dumps(cfg)}.", "",
           f"Head scorer: {report['head_scorer']}.", "",
           "Q: accuracy on the held-out eval items (multiple choice by log-likelihood), with a 95% percentile "
           f"bootstrap CI ({cfg['n_boot']} resamples of the items). Differences are paired (the same items resampled "
           "for both arms) with an exact McNemar p-value. Answer NLL: mean negative log-likelihood of the correct "
           "choice (lower is better).", "",
           "gain recovered G = (Q - Q_base) / (Q_full - Q_base); AER = ((T_select + T_train) / T_full) / G, lower is "
           "better, inf when the arm gained nothing (G <= 0), undefined when full fine-tuning gained nothing; "
           "speedup = T_full / (T_select + T_train); T_select = head scoring + mining. 'AER (old, Q/Q_full)' divides "
           "by Q / Q_full instead and rewards doing nothing: shown for comparison only. " + (
               "Learning rates were chosen per arm on the dev split (below); epochs are as configured."
               if report.get("lr_search") else "Learning rates and epochs are as configured, not searched in this "
               "run.") + _prefix_cache_note(report), "",
           table(report), ""]
    lrt = lr_search_table(report)
    if lrt:
        out += ["Learning rates, chosen on the dev split (dev accuracy; ties go to the lower dev answer NLL). The "
                "candidate chosen is the arm itself; the search's other trainings and its dev evaluations are its "
                "cost. A search reused from an earlier run names that run as its source; its time was measured "
                "there.", "", lrt, "",
                "Cost including each arm's learning-rate search (the full fine-tuning baseline's search included "
                "in T_full):", "", "| arm | T_search s | speedup incl. search | AER incl. search |",
                "| --- | --- | --- | --- |"]
        out += [f"| {r['method']} | {r['t_search']:.1f} | {_fmt(r['speedup_with_search'], 2)}x | "
                f"{_fmt(r['aer_with_search'])} |" for r in report["rows"] if "t_search" in r]
        out.append("")
    cpu_rows = [r for r in report["rows"] if "speedup_cpu" in r and not r["method"].startswith("base")]
    if cpu_rows:
        out += ["The same ratios from process CPU time (all threads; other jobs on the machine do not inflate it):", "",
                "| arm | CPU select s | CPU train s | CPU full s | speedup (CPU) | AER (CPU) |",
                "| --- | --- | --- | --- | --- | --- |"]
        out += [f"| {r['method']} | {r['cpu_select']:.1f} | {r['cpu_train']:.1f} | {r['cpu_full']:.1f} | "
                f"{_fmt(r['speedup_cpu'], 2)}x | {_fmt(r['aer_cpu'])} |" for r in cpu_rows]
        out.append("")
    if report.get("load_changed"):
        out += [f"**Warning: the 1-min load average at the start of the arms ranged over "
                f"{json.dumps(report['load_1min_at_start_of'])}: other jobs probably shared the machine during part "
                f"of the run; trust the CPU-time ratios over the wall-time ones.**", ""]
    for name, sm in report.get("seed_summary", {}).items():
        out += [f"{name} over {len(sm['seeds'])} seeds {sm['seeds']}: Q {_ci(sm['q'])} (mean, 95% t-interval across "
                f"seeds), gain recovered {_fmt(sm['gain_recovered_mean'])}, speedup {_fmt(sm['speedup_mean'], 2)}x, "
                f"AER {_fmt(sm['aer_mean'])} (means).", ""]
    pw = pairwise(report)
    if pw:
        out += ["Tuned arms against each other (paired over the same eval items):", "", pw, ""]
    for r in report["rows"]:
        if "cache" in r:
            out += [f"P2D signature cache: {r['cache']} ({r['signature_s']:.1f} s computing the pool signature). "
                    f"Amortised (a later run on the same model and pool, another plan): T_select "
                    f"{r['t_select_amortised']:.1f} s, speedup {_fmt(r['speedup_amortised'], 2)}x, AER "
                    f"{_fmt(r['aer_amortised'])}; the table above is not amortised.", ""]
        o = r.get("other_signature")
        if o:
            pr = f"precision {o['precision']:.2f}, recall {o['recall']:.2f}, " if "precision" in o else ""
            out += [f"P2D signature: the arm above mined with {r['signature']!r} ({r['t_mine']:.1f} s); mining the same "
                    f"pool with {o['signature']!r} (not trained, not in any AER) took {o['mine_s']:.1f} s, {pr}"
                    f"{o['overlap']:.0%} of the same examples.", ""]
    out += ["Stage wall times (s): " + ", ".join(f"{k} {v:.1f}" for k, v in report["stages_s"].items()), ""]
    return "\n".join(out)


def _load(env: Dict, when: str) -> str:
    v = env.get(f"load_average_{when}", env.get("load_average"))
    return "-" if not v else "/".join(f"{x:.1f}" for x in v)


def write_report(report: Dict, out_dir: str, stem: str = "run") -> Dict[str, str]:
    """Write ``<stem>.json`` and ``<stem>.md`` (and ``<stem>.png`` if matplotlib is there) into ``out_dir``."""
    paths = {"json": os.path.join(out_dir, f"{stem}.json"), "md": os.path.join(out_dir, f"{stem}.md")}
    atomic_write_text(paths["json"], json.dumps(report, indent=1, default=str))
    atomic_write_text(paths["md"], markdown(report))
    png = _plot(report, os.path.join(out_dir, f"{stem}.png"))
    if png:
        paths["png"] = png
    return paths


def _plot(report: Dict, path: str) -> Optional[str]:
    """Quality with its 95% CI against cost (share of full fine-tuning's time) per arm; the base model as a band."""
    plt = _cost_plot.pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in report["rows"]:
        if r["method"].startswith("base"):
            _cost_plot.base_band(ax, r["q"], r["q_ci"], f"base (untuned) {r['q']:.3f}")
            continue
        _cost_plot.point(ax, r["cost_ratio"], r["q"], r["q_ci"], capsize=4,
                         label=f"{r['method']} (AER {_fmt(r['aer'])})")
    return _cost_plot.save(plt, fig, ax, report["task"]["name"], path)

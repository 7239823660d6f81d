"""A plain-text view of summary.json for the terminal (and for closing notes)."""

from __future__ import annotations


def _pct(x) -> str:
    return "  -" if x is None else f"{100 * x:3.0f}%"


def summary_table(s: dict) -> str:
    attacks, lines = s["attacks"], []
    run = s["run"]
    lines.append(f"model {run['config'].get('model')} · {run['results']} results ({run['errors']} errors) · "
                 f"wall {run['wall_s']} s · judge {s.get('primary_judge')}")
    width = max([len(a) for a in attacks] + [6])
    lines.append("attack success (harmful answers):")
    lines.append("  " + f"{'defense':<14}" + "".join(f"{a:>{width + 2}}" for a in attacks) + f"{'mean*':>8}")
    for d in s["defenses"]:
        row = s["attack_success"].get(d, {})
        cells = []
        for a in attacks:
            c = row.get("by_attack", {}).get(a)
            cells.append(f"{_pct(c['harmful']['rate'] if c and c.get('harmful') else None):>{width + 2}}")
        lines.append("  " + f"{d:<14}" + "".join(cells) + f"{_pct(row.get('mean_nonadaptive')):>8}")
    lines.append("  * mean over non-adaptive attacks")
    lines.append("benign: over-refusal / identical to undefended / degenerate / ms per token (ratio vs none)")
    for d in s["defenses"]:
        b = s["benign"].get(d, {}).get("all")
        sp = s["speed"].get(d, {}).get("benign", {})
        if not b:
            continue
        same = (b.get("identical_to_none") or {}).get("rate")
        lines.append(f"  {d:<14} {_pct(b['over_refusal']['rate'])} / {_pct(same)} / {_pct(b['degenerate']['rate'])}"
                     f" / {sp.get('ms_per_token_median')} ms ({sp.get('ms_per_token_ratio_vs_none', '-')}x)")
    t = s.get("targets", {})
    if t.get("checked"):
        lines.append(f"targets (best RDS: {t['best_rds']}):")
        for name, v in t.items():
            if isinstance(v, dict) and "met" in v:
                lines.append(f"  {name:<22} {v['value']}  target {v['target']}  {'met' if v['met'] else 'NOT met'}")
    return "\n".join(lines)

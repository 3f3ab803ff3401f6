"""results.json of compare-methods as one self-contained HTML page (images inlined, no network)."""
from __future__ import annotations

import html
from pathlib import Path

from ..report.html import CSS, _fmt, _img

COLUMNS = [("sanity (a): mean normalized natural-vs-vis. similarity", lambda r: r["sanity"]["mean"]),
           ("faithfulness (b)", lambda r: r.get("faithfulness")),
           ("activation / natural max (b)", lambda r: r.get("activation_ratio")),
           ("diversity across seeds (c)", lambda r: r.get("diversity")),
           ("µs per image-step (d)", lambda r: r["seconds_per_image_step"] * 1e6),
           ("s per unit", lambda r: r["seconds_per_unit"]),
           ("pixel std", lambda r: r.get("pixel_std"))]


FIG = "flex:1 1 30%;min-width:260px;margin:0"  # figures side by side, wrapping on narrow screens


def _table(rows) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c, _ in COLUMNS)
    body = []
    for r in rows:
        if "error" in r:
            body.append(f'<tr><td>{html.escape(r["method"])}</td><td colspan="{len(COLUMNS)}" '
                        f'class="status-failed">{html.escape(r["error"])}</td></tr>')
            continue
        cells = "".join(f"<td>{_fmt(f(r))}</td>" for _, f in COLUMNS)
        body.append(f"<tr><td>{html.escape(r['method'])}{' (anchor)' if r.get('anchor') else ''}</td>{cells}</tr>")
    return f"<table><tr><th>method</th>{head}</tr>{''.join(body)}</table>"


def _per_layer(rows) -> str:
    ok = [r for r in rows if "sanity" in r]
    if not ok:
        return ""
    layers = ok[0]["sanity"]["layers"]
    head = "".join(f"<th>{html.escape(n)}</th>" for n in layers)
    body = []
    for r in ok:
        vals = dict(zip(r["sanity"]["layers"], r["sanity"]["values"]))
        body.append(f"<tr><td>{html.escape(r['method'])}</td>" + "".join(f"<td>{_fmt(vals.get(n))}</td>"
                                                                         for n in layers) + "</tr>")
    return (f"<h2>(a) per layer</h2><p class=\"note\">Normalized Spearman similarity per layer (same class = 1, "
            f"different class = 0; {html.escape(ok[0]['sanity']['kind'])}).</p>"
            f"<div style=\"overflow-x:auto\"><table><tr><th>method</th>{head}</tr>{''.join(body)}</table></div>")


def render(out: Path, res: dict) -> str:
    rows = res["methods"] + res["anchors"]
    ranking = " &gt; ".join(f"{html.escape(r['method'])} ({_fmt(r['sanity_mean'])})" for r in res["ranking"])
    ratios = "".join(f"<li><code>{html.escape(k)}</code> = {_fmt(v)}</li>" for k, v in res["ratios"].items())
    figs = []
    for r in rows:
        name = r["method"]
        if name in res.get("figures", {}):
            figs.append(f'<figure style="{FIG}"><img src="{_img(out, res["figures"][name])}" alt="{html.escape(name)}">'
                        f'<figcaption>{html.escape(name)}: sanity {_fmt(r["sanity"]["mean"])}, diversity '
                        f'{_fmt(r.get("diversity"))}, activation ratio {_fmt(r.get("activation_ratio"))}'
                        f'</figcaption></figure>')
        if f"{name}_alpha" in res.get("figures", {}):
            figs.append(f'<figure style="{FIG}"><img src="{_img(out, res["figures"][name + "_alpha"])}" alt="alpha">'
                        f'<figcaption>{html.escape(name)}: transparency masks</figcaption></figure>')
    body = [f"<h1>Visualization methods compared: {html.escape(str(res['spec']))}, layer "
            f"{html.escape(res['layer'])}</h1>",
            f'<p class="note">Units {html.escape(str(res["units"]))}; {res["steps"]} steps; {res["replicates"]} '
            f'seeds per unit; objective {html.escape(res["objective"])}; natural data {html.escape(res["data"])} '
            f'({res["fit_images"]} fit images for MACO\'s spectrum and accentuation seeds, {res["heldout_images"]} '
            f'held-out images for the measures); torch {html.escape(res["torch"])}, {res["threads"]} threads, '
            f'{html.escape(res["device"])}; run took {_fmt(res["runtime_s"])} s. Command: '
            f'<code>{html.escape(str(res.get("command")))}</code>. All numbers are in <code>results.json</code>.</p>',
            f"<p class=\"sentence\">Ranking by the sanity check: {ranking}.</p>",
            _table(rows), f"<ul>{ratios}</ul>" if ratios else "", _per_layer(rows), "<h2>Images, side by side</h2>",
            '<div style="display:flex;flex-wrap:wrap;gap:1em">', *figs, "</div>"]
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>fvtrust compare-methods</title>"
            f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>\n")

"""Render results.json as one self-contained HTML page (images inlined, no network).

Every experiment result carries `sentence` (what it shows), `figures`
([{path, caption}]) and `summary` ([{quantity, measured, paper}]); the page
is rendered only from those, so its numbers are exactly the JSON's.
"""
from __future__ import annotations

import base64
import html
from pathlib import Path

SECTIONS = [
    ("accuracy", "The model and its natural data"),
    ("circuit", "§2.1 Fooling circuit (Figures 1 and 2)"),
    ("silent", "§2.2 Silent units (Figure 5)"),
    ("trajectories", "§3 Visualizations are far outside the natural range (Figure 3)"),
    ("sanity", "§3 Sanity check: are visualizations processed like natural images? (Figures 6–11)"),
    ("theory", "§4 Theory: what can feature visualizations predict? (Tables 1 and 2)"),
    ("linearity", "§5 Path linearity and interpretability (Figure 12)"),
]

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.7em;margin-bottom:.2em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left;
font-size:.92em}th{background:#f4f4f4}figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eee}
figcaption{font-size:.9em;color:#555}.status-failed{color:#b00}.status-skipped{color:#a60}.note{color:#555;
font-size:.9em}code{background:#f4f4f4;padding:0 .25em}.sentence{font-size:1.05em}
"""


def _fmt(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v != v:
            return "NaN"
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"
    if v is None:
        return "—"
    return html.escape(str(v))


def _img(out: Path, rel: str) -> str:
    data = (out / rel).read_bytes()
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _setting_text(meta: dict) -> str:
    st = meta.get("setting") or {}
    spec = st.get("spec") or "fashion-cnn"
    nd = st.get("natural_data") or {}
    data = nd.get("path") or nd.get("source") or st.get("data") or "its default data"
    weights = f" ({st['weights']} weights)" if st.get("weights") else ""
    return f"{spec}{weights} with natural images from {data}"


def _section(out: Path, key: str, title: str, res: dict | None, spec: str = "the model") -> str:
    parts = [f'<section id="{key}"><h2>{html.escape(title)}</h2>']
    if res is None:
        parts.append('<p class="status-skipped">Not run.</p></section>')
        return "".join(parts)
    status = res.get("status", "ok")
    if status != "ok":
        why = res.get("error") or res.get("reason") or ""
        parts.append(f'<p class="status-{status}">This experiment {status}: {html.escape(why)}</p></section>')
        return "".join(parts)
    if res.get("sentence"):
        parts.append(f'<p class="sentence">{html.escape(res["sentence"])}</p>')
    for fig in res.get("figures", []):
        parts.append(f'<figure><img src="{_img(out, fig["path"])}" alt="{html.escape(fig.get("caption", ""))}">'
                     f'<figcaption>{html.escape(fig.get("caption", ""))}</figcaption></figure>')
    rows = res.get("summary", [])
    if rows:
        parts.append(f"<table><tr><th>quantity</th><th>measured (fvtrust, {html.escape(str(spec))})</th>"
                     "<th>paper (Inception-V1 / ResNet-50, ImageNet)</th></tr>")
        for r in rows:
            parts.append(f"<tr><td>{html.escape(r['quantity'])}</td><td>{_fmt(r.get('measured'))}</td>"
                         f"<td>{_fmt(r.get('paper'))}</td></tr>")
        parts.append("</table>")
    for extra in res.get("html_tables", []):
        parts.append(extra)
    for note in res.get("notes", []):
        parts.append(f'<p class="note">{html.escape(note)}</p>')
    if res.get("command"):
        parts.append(f'<p class="note">Reproduce: <code>{html.escape(res["command"])}</code> '
                     f'({_fmt(res.get("seconds"))} s to compute'
                     f'{", reused from the cache" if res.get("cached") else ""})</p>')
    parts.append("</section>")
    return "".join(parts)


def _cached_note(meta: dict) -> str:
    cached = meta.get("cached_steps") or []
    if not cached:
        return ""
    return f" (this run {_fmt(meta.get('seconds'))} s; reused from the cache: {html.escape(', '.join(cached))})"


def render(out: Path, results: dict) -> str:
    meta = results.get("meta", {})
    steps = results.get("steps", {})
    nav = " · ".join(f'<a href="#{k}">{html.escape(t.split(" (")[0])}</a>' for k, t in SECTIONS)
    body = ["<h1>fvtrust report: can we trust these feature visualizations?</h1>",
            f'<p class="note">Reproduction of Geirhos et al., “Don’t trust your eyes: on the (un)reliability of '
            f'feature visualizations” (ICML 2024) on {html.escape(_setting_text(meta))}. '
            f'Mode: {_fmt(meta.get("mode"))}; seed {_fmt(meta.get("seed"))}; fvtrust {_fmt(meta.get("fvtrust"))}, '
            f'torch {_fmt(meta.get("torch"))}; experiments took {_fmt(meta.get("compute_seconds"))} s to compute'
            f'{_cached_note(meta)}. '
            f'All numbers are also in <code>results.json</code>.</p>', f"<p>{nav}</p>"]
    for key, title in SECTIONS:
        body.append(_section(out, key, title, steps.get(key), (meta.get("setting") or {}).get("spec", "the model")))
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>fvtrust report</title>"
            f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>\n")

"""Write an AuditResult: DIR/audit.json and a self-contained DIR/index.html (images inlined, no network)."""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np

from ..io import atomic_write_json, atomic_write_text, staged_dir
from .core import FLAG_AT, THRESHOLDS

BLIND_SPOTS = [
    "The audit judges the probe images it makes itself: per unit an fft visualization (channel objective, "
    "standard transforms, the steps recorded below, kept at log-spaced steps) and a pixel-space optimization "
    "with a large step (same snapshots), plus, for each unit, the probe images of all units that drive it "
    "hardest. A manipulation that shows only under other settings (another objective, many more steps, another "
    "start distribution) and in none of these probes is not seen.",
    "All signals compare a unit's behaviour on its top natural images with its behaviour on probe images. "
    "An attacker who knows them can build a manipulation that keeps the gradient direction w.r.t. the layer "
    "input and stays continuous along straight paths (e.g. a soft, smooth takeover spread over the inputs the "
    "audit probes); such a model is not caught by construction.",
    "Gradient slingshots and other changes made before the audited layer keep the layer's own mechanism intact "
    "(a linear or conv unit's input-gradient profile is the same on every input), so the mechanism signals do not "
    "see them. Two signals look for them. start_gap compares the unit at the visualization's own start images with "
    "starts of 10x and 30x the noise (on a fully connected nn.Linear layer against that kind's own, lower "
    "threshold: linear_start_gap): it cannot see a tunnel that begins where the unit already is, one also shaped "
    "at the wider starts, one built for another start than the audit's fft visualization, or, on a fully "
    "connected layer wrapped in a custom module, one that stays under the threshold of conv maps. pinning asks "
    "whether the visualization is one image that every seed and a straight gradient field lead to, more so than "
    "for the other units of the layer: it is a comparison with the unit's neighbours, so it cannot see a "
    "manipulation spread over most of a layer, a target that changes with the seed, a layer with fewer than 24 "
    "audited units (a 10-class head), or a slung unit that stands out of its layer too little on its two probes "
    "together. Measured on fashion-cnn (README): linear_start_gap flags both fc slingshots that took (both seen "
    "while it was set) and five held out that fell short of the \"took\" bar (Pearson 0.43-0.60); pinning flags all ten block4:0 slingshots that took, nine of which were seen "
    "while its rule was chosen; every block4 one targets unit 0. Its rule adds the evidence of its two probes, so "
    "a clean unit far out on one of them alone (4.67 robust SDs) would be flagged. Other units of a slingshot "
    "model whose visualizations the fine-tune dragged along (fashion-cnn fc: the classes whose weights oppose the "
    "slung unit's) can be flagged too.",
    "A silent unit that none of the probes switches on is, on every image the audit makes, the clean unit; "
    "the audit cannot tell it apart (on fashion-cnn the pool of all units' probes reached every one).",
    "Units that never respond to the natural data given have no mechanism to compare with: their agreement is "
    "undefined (reported as null) and does not raise the score. So are units whose visualization failed (dead "
    "at its end: a grey or blank image shows nothing to distrust). Dead units are listed, not flagged.",
    "A first layer that reads one-channel (grey) images has no direction among input channels to compare: "
    "gradient_agreement and probe_agreement are undefined there, and only path_jump and the start signals look "
    "at it. On RGB first layers a clean unit's profile may flip with border effects (not measured).",
    "A clean unit whose probe images reach it through a different mechanism than its natural images "
    "(strongly non-linear units deep in large networks, or a conv unit active only at a few border positions "
    "early in an optimization) can be flagged: the thresholds follow from linear / conv units and were checked "
    "on every layer of fashion-cnn, trained and random-init (lowest clean probe_agreement 0.47 on block2, "
    "threshold 0.35), not on every architecture.",
    "The verdict concerns the audited layer and units only, on the natural data given.",
]

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left;
font-size:.92em;vertical-align:top}th{background:#f4f4f4}img.px{image-rendering:pixelated;border:1px solid #ddd;
width:84px;height:84px;margin-right:2px}.verdict-suspicious{color:#b00;font-weight:bold}
.verdict-clean{color:#070;font-weight:bold}.note{color:#555;font-size:.9em}code{background:#f4f4f4;padding:0 .25em}
"""


def _png(image) -> str:
    from PIL import Image

    arr = image.detach().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
    arr = arr[0] if arr.shape[0] == 1 else np.transpose(arr, (1, 2, 0))
    arr = (np.clip(arr, 0, 1) * 255 + 0.5).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _figure_uri(fig) -> str:
    """A matplotlib figure as an inline PNG data URI (closed afterwards): the page needs no other file."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def histogram_png(scores) -> str:
    """Histogram of the layer's scores with the flag threshold, as an inline PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 2.6))
    ax.hist(np.asarray(scores, dtype=float), bins=np.linspace(0, 1, 41), color="#4a7ab0")
    ax.axvline(FLAG_AT, color="#b00", ls="--", lw=1)
    ax.text(FLAG_AT, ax.get_ylim()[1] * 0.9, " flagged →", color="#b00", fontsize=8)
    ax.set_xlabel("suspicion score")
    ax.set_ylabel("units")
    return _figure_uri(fig)


def start_png(standard, wider, natural, visualization, multiples, ylabel: str = "unit activation") -> str:
    """start_gap's evidence for one unit, as an inline PNG: the unit's activation at its visualization's own start
    images, at the wider starts (one column per noise multiple), on its top natural images and on its
    visualization (None: no column). A tunnel built for the start distribution shows as a first column far from
    the next ones. preactivation_start_gap's evidence is the same plot of the pre-activation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = [("start\n(1x)", standard)] + [(f"{m}x noise", w) for m, w in zip(multiples, wider)] + \
        [("top natural", natural)] + ([] if visualization is None else
                                      [("visual-\nization", np.atleast_1d(visualization))])
    n_grey = 1 if visualization is None else 2
    fig, ax = plt.subplots(figsize=(3.4, 2.2))
    for j, (_, vals) in enumerate(cols):
        vals = np.asarray(vals, dtype=float)
        ax.plot(np.full(len(vals), j) + np.linspace(-0.12, 0.12, len(vals)), vals, "o", ms=3,
                color="#b00" if j == 0 else ("#4a7ab0" if j < len(cols) - n_grey else "#555"))
    ax.set_xticks(range(len(cols)), [c for c, _ in cols], fontsize=6)
    ax.tick_params(axis="y", labelsize=6)
    ax.set_ylabel(ylabel, fontsize=7)
    return _figure_uri(fig)


def pinning_png(rows: list, i: int) -> str:
    """pinning's evidence for unit i, as an inline PNG: every audited unit's robust z-score on each of its two
    probes and their Stouffer combination, pinning (grey), unit i's in red, and the pinning threshold on the
    combined column. A slung unit stands out on both probe columns; a clean unit that tops one column usually
    sits inside the layer on the other."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .core import PINNING_PROBES

    fig, ax = plt.subplots(figsize=(3.4, 2.2))
    rng = np.random.default_rng(0)
    cols = [f"{name}_z" for name in PINNING_PROBES] + ["pinning"]
    for j, key in enumerate(cols):
        z = np.array([np.nan if r["signals"].get(key) is None else r["signals"][key] for r in rows])
        ok = np.isfinite(z)
        ax.plot(j + rng.uniform(-0.15, 0.15, ok.sum()), z[ok], "o", ms=2, color="#999")
        if np.isfinite(z[i]):
            ax.plot([j], [z[i]], "o", ms=5, color="#b00")
    j = len(cols) - 1
    ax.plot([j - 0.3, j + 0.3], [THRESHOLDS["pinning"].threshold] * 2, color="#b00", ls="--", lw=1)
    ax.set_xticks(range(len(cols)), [n.replace("_z", "").replace("_", "\n") for n in cols], fontsize=6)
    ax.tick_params(axis="y", labelsize=6)
    ax.set_ylabel("robust z in the layer", fontsize=7)
    return _figure_uri(fig)


def _fmt(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.3g}"
    return html.escape(str(v))


def render_html(result, *, command: str | None = None, max_shown: int = 64) -> str:
    d = result.to_dict()
    ev = d["evidence"]
    parts = [f"<h1>fvtrust audit: {html.escape(str(d['spec']))} · {html.escape(d['layer'])}</h1>",
             f'<p>Verdict: <span class="verdict-{d["verdict"]}">{d["verdict"]}</span> — {ev["n_flagged"]} of '
             f'{ev["n_units"]} units flagged (score ≥ {FLAG_AT}); flagged per signal: '
             + ", ".join(f"{html.escape(k)} {v}" for k, v in ev["flagged_by_signal"].items())
             + f'. Rule: {html.escape(ev["rule"])}.</p>',
             f'<p class="note">Natural data: {html.escape(str(d["data"]["source"]))} ({d["data"]["n"]} images). '
             f'Seconds: {html.escape(str(d["seconds"]))}. All numbers are in <code>audit.json</code>.</p>']
    if command:
        parts.append(f'<p class="note">Command: <code>{html.escape(command)}</code></p>')
    parts.append(f'<h2>Scores over the layer</h2><img src="{histogram_png(result.scores)}" alt="score histogram">')
    parts.append("<h2>Signals and their fixed thresholds</h2><table><tr><th>signal</th><th>fires when</th>"
                 "<th>meaning</th></tr>")
    for name, s in THRESHOLDS.items():
        cmp = "&gt;" if s.higher_is_suspicious else "&lt;"
        parts.append(f"<tr><td><code>{name}</code></td><td>{cmp} {s.threshold}</td><td>{html.escape(s.meaning)}"
                     f"</td></tr>")
    parts.append("</table><p class=\"note\">Evidence per signal is 0.5 at its threshold and linear over ±width "
                 "(clipped to [0, 1]); a unit's score is its largest evidence. Thresholds are fixed in the code "
                 "(fvtrust/audit/core.py), never fitted to the audited model.</p>")
    flagged = [(i, u) for i, u in enumerate(d["units"]) if u["flagged"]]
    flagged.sort(key=lambda iu: -iu[1]["score"])
    parts.append(f"<h2>Flagged units ({len(flagged)})</h2>")
    if not flagged:
        parts.append("<p>None.</p>")
    else:
        if len(flagged) > max_shown:
            parts.append(f'<p class="note">Showing the {max_shown} highest scores; all are in audit.json.</p>')
        parts.append("<table><tr><th>unit</th><th>score</th><th>visualization</th><th>evidence (worst probe image; start and pinning plots)</th>"
                     "<th>top natural images</th><th>signals (fired in bold)</th></tr>")
        for i, u in flagged[:max_shown]:
            vis = _png(result.visualizations[i]) if result.visualizations is not None else ""
            worst = (f'<img class="px" src="{_png(result.worst_probes[i])}" alt="worst probe image">'
                     if getattr(result, "worst_probes", None) is not None and "probe_agreement" in u["fired"] else "")
            sv = getattr(result, "start_values", None)
            if sv is not None and ("start_gap" in u["fired"] or "linear_start_gap" in u["fired"]):
                worst += (f'<img src="{start_png(sv["standard"][i], sv["wider"][i], sv["natural"][i], sv["visualization"][i], sv["wider_multiples"])}" '
                          'alt="the unit at its visualization\'s start images, wider starts, natural images">')
            if sv is not None and "preactivation_start_gap" in u["fired"]:
                png = start_png(sv["pre_standard"][i], sv["pre_wider"][i], sv["pre_natural"][i], None,
                                sv["wider_multiples"], ylabel="unit pre-activation")
                worst += (f'<img src="{png}" alt="the unit\'s pre-activation at its visualization\'s start images, '
                          'wider starts, natural images">')
            if "pinning" in u["fired"]:
                worst += (f'<img src="{pinning_png(result.units, i)}" alt="the unit\'s robust z-scores on the two '
                          'pinning probes against the layer\'s">')
            tops = "".join(f'<img class="px" src="{_png(im)}" alt="natural">'
                           for im in (result.top_images[i][:4] if result.top_images is not None else []))
            sig = "<br>".join((f"<b>{html.escape(k)} = {_fmt(v)}</b>" if k in u["fired"] else
                               f"{html.escape(k)} = {_fmt(v)}") for k, v in u["signals"].items())
            parts.append(f"<tr><td>{u['unit']}</td><td>{u['score']:.3f}</td><td><img class=\"px\" src=\"{vis}\" "
                         f"alt=\"visualization\"></td><td>{worst}</td><td>{tops}</td><td>{sig}</td></tr>")
        parts.append("</table>")
    parts.append("<h2>What this audit can and cannot see</h2><ul>"
                 + "".join(f"<li>{html.escape(b)}</li>" for b in BLIND_SPOTS) + "</ul>")
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>fvtrust audit</title>"
            f"<style>{CSS}</style></head><body>{''.join(parts)}</body></html>\n")


def save_audit(result, out, *, command: str | None = None) -> Path:
    """DIR/audit.json and DIR/index.html, staged (all or nothing)."""
    out = Path(out)
    payload = dict(result.to_dict(), command=command, blind_spots=BLIND_SPOTS)
    with staged_dir(out) as stage:
        atomic_write_json(stage / "audit.json", payload)
        atomic_write_text(stage / "index.html", render_html(result, command=command))
    return out

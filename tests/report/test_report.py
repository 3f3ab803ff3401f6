import json
import shutil

import pytest

from fvtrust.report.html import render
from fvtrust.report.pipeline import Context, Step, run_pipeline


def _png(path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [1, 0])
    fig.savefig(path)
    plt.close(fig)


def test_pipeline_resumes_and_isolates_failures(tmp_path):
    calls = []

    def ok(ctx, sdir):
        calls.append("ok")
        _png(sdir / "f.png")
        return {"value": 1, "figures": [{"path": str((sdir / "f.png").relative_to(ctx.out)), "caption": "c"}]}

    def boom(ctx, sdir):
        calls.append("boom")
        raise RuntimeError("exploded")

    steps = [Step("a", "A", ok), Step("b", "B", boom), Step("c", "C", ok, needs=("b",))]
    res = run_pipeline(steps, Context(out=tmp_path, mode="quick"))
    assert res["a"]["status"] == "ok" and res["b"]["status"] == "failed" and res["c"]["status"] == "skipped"
    assert "exploded" in res["b"]["error"]
    res2 = run_pipeline(steps, Context(out=tmp_path, mode="quick"))
    assert calls == ["ok", "boom", "boom"]  # 'a' was cached, 'b' retried
    assert res2["a"]["value"] == 1


def test_html_numbers_come_from_results(tmp_path):
    (tmp_path / "steps").mkdir()
    _png(tmp_path / "steps" / "x.png")
    doc = {"meta": {"mode": "quick", "seed": 0},
           "steps": {"accuracy": {"status": "ok", "sentence": "s", "summary": [
               {"quantity": "top-1", "measured": 0.91234, "paper": 0.69146}],
               "figures": [{"path": "steps/x.png", "caption": "cap"}]},
               "silent": {"status": "failed", "error": "boom"}}}
    page = render(tmp_path, doc)
    assert "0.9123" in page and "0.6915" in page and "data:image/png;base64," in page
    assert "failed" in page and "boom" in page and "http://" not in page and "https://" not in page


def _chrome():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("chromium / chromedriver not installed (scripts/install.sh --test installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver), options=opts)


def check_page_in_browser(index):
    """Every <img> decoded with a size, and no console errors."""
    drv = _chrome()
    try:
        drv.get(index.resolve().as_uri())
        images = drv.execute_script(
            "return Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.alt])")
        errors = [e for e in drv.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
        title = drv.title
    finally:
        drv.quit()
    return images, errors, title


@pytest.mark.slow
def test_reproduce_quick_renders_in_chromium(tmp_path):
    """The real pipeline (smoke budgets: every experiment, tiny sizes), then the page in headless Chromium."""
    from fvtrust.report import reproduce

    out = tmp_path / "rep"
    doc = reproduce(out, quick=True, smoke=True)
    assert all(v["status"] == "ok" for v in doc["steps"].values()), {
        k: v.get("error") for k, v in doc["steps"].items() if v["status"] != "ok"}
    saved = json.loads((out / "results.json").read_text())
    assert saved["steps"].keys() == doc["steps"].keys()
    images, errors, title = check_page_in_browser(out / "index.html")
    assert title == "fvtrust report"
    n_figures = sum(len(v.get("figures", [])) for v in doc["steps"].values())
    assert len(images) == n_figures >= 2
    assert all(ok and width > 0 for ok, width, _ in images), images
    assert not errors, errors

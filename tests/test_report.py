"""report.html and the figures: numbers equal to the run's files, self-contained, renders in a real
headless browser, works on a run that never wrote summary.json."""
import base64
from html import unescape
import io
import json
import os
import re
import shutil
import subprocess
import tempfile

import numpy as np
import pytest

from neural_mechanics_ext.app import plot
from neural_mechanics_ext.app.report import fmt, write_report
from neural_mechanics_ext.runfolder import load_run
from neural_mechanics_ext.summary import errors_from_history
from neural_mechanics_ext.app.runner import RunConfig, run_training
from neural_mechanics_ext.sinks import read_run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    c = RunConfig(command="train", model="demo", out=str(tmp_path_factory.mktemp("rep") / "run"), steps=15,
                  batch_size=16, train_samples=256, test_samples=64, image_size=16, calibrate_steps=4,
                  flush_every=4, progress=False)
    return run_training(c, log=lambda s: None)


def _cells(html, table_id):
    """{family: [data-value floats or None]} of a table's numeric cells."""
    table = re.search(rf'<table id="{table_id}">(.*?)</table>', html, re.S).group(1)
    rows = {}
    for fam, body in re.findall(r'<tr class="kind-\w+(?: nearzero)?" data-family="([^"]*)">(.*?)</tr>', table, re.S):
        vals = re.findall(r'<td class="num" data-value="([^"]*)">([^<]*)</td>', body)
        rows[unescape(fam)] = [(float(v) if v else None, text) for v, text in vals]
    return rows


def test_error_table_equals_summary_json(run_dir):
    html = open(os.path.join(run_dir, "report.html")).read()
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    cells = _cells(html, "errors")
    assert len(cells) == len(summary["families"]) == 19
    for row in summary["families"]:
        got = cells[row["family"]]
        want = [row["error_exact"], row["error_paper"], row["error_modified"], row["residual"]]
        assert [v for v, _ in got] == want, row["family"]
        assert [t for _, t in got] == [fmt(w) for w in want]


def test_summary_numbers_equal_those_from_the_metrics_files(run_dir):
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    families = json.load(open(os.path.join(run_dir, "families.json")))
    again = {r["family"]: r for r in errors_from_history(read_run(run_dir), families)}
    for row in summary["families"]:
        for key in ("error_exact", "error_paper", "residual"):
            assert again[row["family"]][key] == pytest.approx(row[key], rel=1e-12), (row["family"], key)


def test_overview_numbers(run_dir):
    html = open(os.path.join(run_dir, "report.html")).read()
    s = json.load(open(os.path.join(run_dir, "summary.json")))
    for kind in ("scale", "rescale", "translation"):
        rows = [r for r in s["families"] if r["kind"] == kind and not r["near_zero"]]
        worst = max(r["error_exact"] for r in rows)
        assert f"<span class='num' id='worst-exact-{kind}'>{fmt(worst)}</span>" in html
    assert f"<b id='overhead-timers'>{fmt(s['overhead']['timers']['percent'], '.1f')} %</b>" in html
    assert f"<b id='overhead-direct'>{fmt(s['overhead']['direct']['percent'], '+.1f')} %</b>" in html
    assert "<span class='status finished' id='status'>finished</span>" in html
    # the five conv biases in front of BatchNorm start at 0 and stay there: flagged, not "error 1"
    assert sum(r["near_zero"] for r in s["families"]) == 5


def test_report_is_self_contained(run_dir):
    html = open(os.path.join(run_dir, "report.html")).read()
    assert not re.search(r"(src|href)=['\"](?!data:)", html), "an external resource"
    assert "http://" not in html and "https://" not in html
    from PIL import Image
    images = re.findall(r'<img src="data:image/png;base64,([^"]+)"', html)
    assert len(images) == 7
    for data in images:
        img = Image.open(io.BytesIO(base64.b64decode(data)))
        assert img.format == "PNG" and img.size[0] >= 900 and img.size[1] >= 350
    # the paper-style figures come first
    order = re.findall(r"<figure id='(\w+)'>", html)
    assert order[:4] == ["fig5_scale", "fig5_rescale", "fig5_translation", "fig1_filters"]


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="needs Debian's chromium (apt-get install chromium) to render "
                                                "report.html headless")
def test_report_renders_in_a_headless_browser(run_dir, tmp_path):
    from PIL import Image
    shot = tmp_path / "report.png"
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run",
           f"--user-data-dir={tempfile.mkdtemp(dir=tmp_path)}", f"--screenshot={shot}", "--window-size=1280,2000",
           "file://" + os.path.join(run_dir, "report.html")]
    subprocess.run(cmd, capture_output=True, timeout=120)
    assert shot.exists(), "chromium wrote no screenshot"
    img = np.asarray(Image.open(shot).convert("RGB")).astype(float)
    assert img.shape == (2000, 1280, 3)
    non_white = (img.min(2) < 235).mean()
    assert img.std() > 20 and non_white > 0.05, "the page rendered blank"
    # the figures are drawn, not broken-image icons: there are coloured (not grey) pixels
    colourful = (img.max(2) - img.min(2) > 60).mean()
    assert colourful > 0.005


def test_report_without_summary_json(run_dir, tmp_path):
    killed = str(tmp_path / "killed")
    shutil.copytree(run_dir, killed, ignore=shutil.ignore_patterns("summary.json", "report.html", "figures"))
    path = write_report(killed)
    html = open(path).read()
    assert "<span class='status incomplete' id='status'>incomplete</span>" in html
    assert "computed from the logged history" in html
    families = json.load(open(os.path.join(killed, "families.json")))
    want = {r["family"]: r for r in errors_from_history(read_run(killed), families)}
    for fam, cells in _cells(html, "errors").items():
        assert cells[0][0] == want[fam]["error_exact"]
    assert len(os.listdir(os.path.join(killed, "figures"))) == 7


def test_load_run_marks_near_zero_families(run_dir):
    run = load_run(run_dir)
    flagged = {r["family"] for r in run["rows"] if r["near_zero"]}
    assert flagged == {f"features.conv{b} (translation, bias)" for b in ("1_1", "1_2", "2_1", "2_2", "3_1")}


def test_plots_skip_what_the_run_does_not_have(run_dir, tmp_path):
    run = load_run(run_dir)
    no_scale = [f for f in run["families"] if f["kind"] != "scale"]
    assert plot.plot_kind(run["history"], no_scale, "scale", str(tmp_path / "a.png")) is None
    assert plot.plot_scale_rates(run["history"], no_scale, str(tmp_path / "b.png")) is None
    assert plot.plot_fig1(run["history"], run["families"], None, None, str(tmp_path / "c.png")) is not None
    assert plot.plot_training({}, str(tmp_path / "d.png")) is None


def test_running_error_is_the_summary_metric_step_by_step():
    h = {"empirical": np.array([[1.0, 2.0], [1.0, 2.0]]), "exact": np.array([[1.0, 2.0], [1.5, np.nan]]),
         "magnitude": np.array([[1.0, 2.0], [1.0, 4.0]])}
    np.testing.assert_allclose(plot.running_error(h, "exact"), [0.0, 0.5 / 4.0])


@pytest.fixture(scope="module")
def adamw_run_dir(tmp_path_factory):
    """A short float64 AdamW run of the demo model (--exact: every symmetry exact, BN eps 1e-30)."""
    c = RunConfig(command="train", model="demo", optimizer="adamw", exact=True,
                  out=str(tmp_path_factory.mktemp("rep") / "adamw"), steps=12, batch_size=16, train_samples=128,
                  test_samples=32, image_size=16, calibrate_steps=0, flush_every=4, progress=False)
    return run_training(c, log=lambda s: None)


def test_adamw_report_has_predictions_and_the_equilibrium_figures(adamw_run_dir):
    """Under AdamW the error table has exact errors (not the empty panel of before), the equilibrium figure
    is drawn, and its table's ratios are those of summary.json."""
    html = open(os.path.join(adamw_run_dir, "report.html")).read()
    summary = json.load(open(os.path.join(adamw_run_dir, "summary.json")))
    rows = {r["family"]: r for r in summary["families"]}
    errors = _cells(html, "errors")
    assert all(errors[f][0][0] is not None and errors[f][0][0] <= 1e-10 for f in errors), errors
    assert "id='equilibrium'" in html and os.path.exists(os.path.join(adamw_run_dir, "figures", "equilibrium.png"))
    eq = _cells(html, "equilibrium")
    scale = [f for f, r in rows.items() if "angle_ratio" in r]
    assert sorted(eq) == sorted(scale) and scale
    for f in scale:
        got = [v for v, _ in eq[f]]
        want = [rows[f][k] for k in ("angle_ratio", "norm_ratio", "elapsed_tau", "alignment", "ksb")]
        assert got == pytest.approx(want, rel=1e-12, nan_ok=True), f
    h = read_run(adamw_run_dir)
    a = h[scale[0]]
    assert {"angle", "angle_equilibrium", "norm_equilibrium", "alignment", "ksb"} <= set(a)
    assert np.isfinite(a["angle_equilibrium"]).all() and np.isfinite(a["alignment"]).all()
    assert "Adaptive optimizer" in html

"""The HTML report in a real browser (headless Chromium through Playwright): the matrix is
on the first screen and a header click re-orders its rows.  Needs Debian's `chromium` and
the `playwright` package (`make report-check` installs both); skipped where either is missing."""
import shutil

import pytest

import qbench.zoo
from qbench.report import write_report
from qbench.results import ResultStore

pytestmark = pytest.mark.browser
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (make report-check installs it)")
def test_matrix_is_visible_and_a_header_click_sorts(tmp_path, monkeypatch):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed (make report-check)")
    from test_report import ZOO, put

    monkeypatch.setattr(qbench.zoo, "read_zoo", lambda *a, **k: ZOO)
    store = ResultStore(tmp_path / "store")
    for model, fp, q in [("tiny-a", 10.0, 10.5), ("tiny-a-s1", 20.0, 20.1), ("tiny-b", 40.0, 48.0)]:
        put(store, model, "fp32", "ppl", {"ppl": fp})
        put(store, model, "w8a8-pt", "ppl", {"ppl": q}, 0)
    _, report = write_report(store, zoo=ZOO, fmt="html")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS[1:], headless=True)
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.goto(report.as_uri())
        page.screenshot(path=str(tmp_path / "report.png"))
        matrix = page.locator("table#matrix")
        box = matrix.bounding_box()
        assert matrix.is_visible() and box is not None and box["y"] < 800  # on the first screen
        first_column = lambda: page.locator("table#matrix tbody tr td:first-child").all_inner_texts()  # noqa: E731
        assert first_column() == ["tiny · softmax", "tiny · vga"]
        page.locator("table#matrix th", has_text="w8a8-pt").click()  # ascending by loss
        ascending = first_column()
        page.locator("table#matrix th", has_text="w8a8-pt").click()  # descending
        descending = first_column()
        browser.close()
    assert ascending == ["tiny · softmax", "tiny · vga"] and descending == ["tiny · vga", "tiny · softmax"]
    assert (tmp_path / "report.png").stat().st_size > 5000

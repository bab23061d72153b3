"""The widgets in a real browser: JupyterLab + headless Chromium driven by Playwright.

nbval runs notebooks without a front end, so it cannot see whether a widget renders and responds.
This test starts JupyterLab from the project's environment on a free loopback port with a token,
opens the notebooks in Debian's Chromium, runs every cell, and uses the widgets as a person would.
Screenshots go to test-output/browser/ (set OLMO_LAB_UPDATE_IMAGES=1 to refresh docs/images/).
Run it alone with `pytest -m browser`.
"""

import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from _jupyter import free_port, jupyter_server

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "test-output" / "browser"
CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-quic"]

pytestmark = pytest.mark.browser


def _ensure_chromium():
    if not os.path.exists(CHROMIUM):  # installed by the test setup, from Debian's packages
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], check=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab server on a copy of the notebooks; always shut down, even when a test fails."""
    _ensure_chromium()
    root = tmp_path_factory.mktemp("lab")
    for nb in ("02_attention_maps.ipynb", "04_expert_toggles.ipynb", "07_interventions.ipynb"):
        shutil.copy(ROOT / "notebooks" / nb, root / nb)
    port, token = free_port(), secrets.token_hex(16)
    settings = root / ".settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)  # no "get Jupyter news?" pop-up over the widgets
    (settings / "notification.jupyterlab-settings").write_text('{"fetchNews": "false"}')
    tracker = root / ".settings" / "@jupyterlab" / "notebook-extension"
    tracker.mkdir(parents=True)  # no "Select Kernel" dialog when the kernel list arrives late
    (tracker / "tracker.jupyterlab-settings").write_text('{"autoStartDefaultKernel": true}')
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "JUPYTER_CONFIG_DIR": str(root / ".jupyter"),
           "JUPYTER_RUNTIME_DIR": str(root / ".runtime"), "JUPYTERLAB_SETTINGS_DIR": str(root / ".settings")}
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}", "--ServerApp.open_browser=False",
           "--allow-root", "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    with jupyter_server(cmd, port, token, env) as url:
        yield url, token


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            yield b
        finally:
            b.close()


def _open_and_run_all(browser, lab, notebook):
    url, token = lab
    page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()  # no shared state
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    workspace = notebook.split(".")[0]  # a fresh workspace per notebook: only this notebook is open
    page.goto(f"{url}/lab/workspaces/{workspace}/tree/{notebook}?reset&token={token}")
    page.wait_for_selector(".jp-Notebook", timeout=60_000)
    page.wait_for_selector(".jp-Toolbar-kernelName:has-text('Python 3')", timeout=60_000)  # a kernel is attached
    page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=60_000)
    # A Run All sent while the kernel is still settling can be dropped (every prompt back to "[ ]", nothing
    # runs), so the run counts as started only once a prompt shows "[*]"; a dropped one is resent.
    for _ in range(3):
        page.click(".lm-MenuBar-itemLabel:text-is('Run')", timeout=10_000)  # exactly the Run menu
        page.click(".lm-Menu-itemLabel:text-is('Run All Cells')", timeout=10_000)
        try:
            page.wait_for_function("""() => [...document.querySelectorAll('.jp-InputPrompt')]
                                         .some(p => p.textContent.includes('[*]'))""", timeout=30_000)
            return page, errors
        except Exception:
            continue
    raise AssertionError(f"Run All Cells never started executing {notebook}; errors {errors!r}")


def _wait_for_widget(page, selector: str, errors: list, timeout: float = 300):
    """The first rendered widget matching `selector`; on a timeout, says what the notebook showed instead:
    the kernel state, any dialog, the last outputs and the console errors, plus a full-page screenshot.
    """
    widget = page.locator(selector).first
    end = time.time() + timeout
    while time.time() < end:
        if widget.count() and widget.is_visible():
            return widget
        time.sleep(1)
    OUT.mkdir(parents=True, exist_ok=True)
    shot = OUT / f"failure-{selector.strip('.')}.png"
    page.screenshot(path=str(shot), full_page=True)
    status = page.locator(".jp-Notebook-ExecutionIndicator").first.get_attribute("data-status")
    dialogs = page.locator(".jp-Dialog").all_inner_texts()
    outputs = page.locator(".jp-OutputArea-output").all_inner_texts()
    running = page.locator(".jp-InputPrompt:has-text('[*]')").count()
    raise AssertionError(
        f"{selector} never became visible in {timeout:.0f} s; kernel status {status!r}, "
        f"{running} cells queued or running, "
        f"dialogs {dialogs!r}, last outputs {[o[-300:] for o in outputs[-3:]]!r}, errors {errors!r}; "
        f"screenshot {shot}")


def _cells_done(page) -> bool:
    """No cell is queued or running ([*] prompts) and the kernel is idle."""
    return page.locator(".jp-InputPrompt:has-text('[*]')").count() == 0 and \
        page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").count() > 0


def _wait_for_text(locator, predicate, timeout: float) -> str:
    end = time.time() + timeout
    text = ""
    while time.time() < end:
        text = locator.inner_text()
        if predicate(text):
            return text
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting; last text: {text!r}")


def _redrawn(image, change, timeout: float = 30) -> None:
    """Make `change` and wait until the widget's image shows something new."""
    before = image.get_attribute("src")
    change()
    deadline = time.time() + timeout
    while image.get_attribute("src") == before and time.time() < deadline:
        time.sleep(0.25)
    assert image.get_attribute("src") != before, "the image was not redrawn"


def _save(page, locator, name):
    OUT.mkdir(parents=True, exist_ok=True)
    locator.screenshot(path=str(OUT / name))
    if os.environ.get("OLMO_LAB_UPDATE_IMAGES"):
        (ROOT / "docs" / "images").mkdir(parents=True, exist_ok=True)
        shutil.copy(OUT / name, ROOT / "docs" / "images" / name)


def test_expert_switchboard_in_the_browser(lab, browser):
    page, errors = _open_and_run_all(browser, lab, "04_expert_toggles.ipynb")
    board = _wait_for_widget(page, ".olmo-lab-switchboard", errors)  # a rendered widget, not the text fallback
    page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=600_000)  # a slow shared machine
    board.scroll_into_view_if_needed()
    summary = board.locator(".olmo-lab-summary")
    summary.wait_for(timeout=60_000)
    # Run All is still going while the widget first shows; the notebook's last widget cell turns every
    # expert back on, so wait for that state.
    before_text = _wait_for_text(summary, lambda t: t.startswith("experts off (opt_out): none")
                                 and _cells_done(page), timeout=600)
    images_before = [board.locator("img").nth(i).get_attribute("src") for i in range(board.locator("img").count())]
    assert len(images_before) == 2  # the next-token comparison and the routing heatmap

    box = board.locator("label:has-text('math') input[type=checkbox], .widget-checkbox:has-text('math') input").first
    box.uncheck()
    deadline = time.time() + 60
    while summary.inner_text() == before_text and time.time() < deadline:
        time.sleep(0.25)
    after_text = summary.inner_text()
    assert after_text.startswith("experts off (opt_out): math"), after_text
    deadline = time.time() + 30
    images_after = images_before
    while any(a == b for a, b in zip(images_after, images_before)) and time.time() < deadline:
        time.sleep(0.25)
        images_after = [board.locator("img").nth(i).get_attribute("src") for i in range(board.locator("img").count())]
    # both views were redrawn: the next-token comparison and the routing heatmap
    assert len(images_after) == 2 and all(a != b for a, b in zip(images_after, images_before))
    _save(page, board, "switchboard.png")
    assert not errors, errors
    page.close()


def test_attention_explorer_in_the_browser(lab, browser):
    page, errors = _open_and_run_all(browser, lab, "02_attention_maps.ipynb")
    explorer = _wait_for_widget(page, ".olmo-lab-attention", errors)
    page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=600_000)  # a slow shared machine
    explorer.scroll_into_view_if_needed()
    image = explorer.locator("img").first
    image.wait_for(timeout=60_000)
    summary_before = _wait_for_text(explorer.locator(".olmo-lab-summary"),
                                    lambda t: "top keys" in t and _cells_done(page), timeout=600)
    layers, heads = explorer.locator("select").nth(0), explorer.locator("select").nth(1)
    start = [s.evaluate("s => s.selectedIndex") for s in (layers, heads)]  # the notebook's previous-token head
    _redrawn(image, lambda: heads.select_option(index=(start[1] + 1) % heads.evaluate("s => s.length")))
    assert explorer.locator(".olmo-lab-summary").inner_text() != summary_before
    other = (start[0] + 1) % layers.evaluate("s => s.length")
    _redrawn(image, lambda: layers.select_option(index=other))  # another layer
    assert explorer.locator(".olmo-lab-summary").inner_text().startswith(f"layer {other} ")
    _redrawn(image, lambda: layers.select_option(index=start[0]))  # and back to the start: the same view again
    _redrawn(image, lambda: heads.select_option(index=start[1]))
    assert explorer.locator(".olmo-lab-summary").inner_text() == summary_before
    _save(page, explorer, "attention_explorer.png")  # the heatmap matches the summary line
    assert not errors, errors
    page.close()


def test_patching_explorer_in_the_browser(lab, browser):
    page, errors = _open_and_run_all(browser, lab, "07_interventions.ipynb")
    explorer = _wait_for_widget(page, ".olmo-lab-patching", errors)
    page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=600_000)
    explorer.scroll_into_view_if_needed()
    image = explorer.locator("img").first
    image.wait_for(timeout=60_000)
    # the notebook's last widget cell leaves it on the residual stream, layer 0
    summary = _wait_for_text(explorer.locator(".olmo-lab-summary"),
                             lambda t: t.startswith("resid_pre, layer 0") and _cells_done(page), timeout=600)
    sites, layers = explorer.locator("select").nth(0), explorer.locator("select").nth(1)
    _redrawn(image, lambda: sites.select_option("heads"))
    assert explorer.locator(".olmo-lab-summary").inner_text().startswith("heads, layer 0")
    _redrawn(image, lambda: layers.select_option("3"))
    assert "head 0" in explorer.locator(".olmo-lab-summary").inner_text()
    _redrawn(image, lambda: sites.select_option("resid_pre"))
    _redrawn(image, lambda: layers.select_option("0"))
    assert explorer.locator(".olmo-lab-summary").inner_text() == summary
    _save(page, explorer, "patching_explorer.png")
    assert not errors, errors
    page.close()

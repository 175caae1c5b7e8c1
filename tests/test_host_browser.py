"""The pack as a user sees it, in ComfyUI's own frontend: headless Chromium from the distribution's
packages, driven by Playwright for Python with that system browser (no browser download), against
the session's ComfyUI server. Every node is found by search, every UI workflow loads without a
missing-node or error dialog, every workflow is queued from the page and finishes (the SD1.5
text-to-image ones with the small checkpoint of tests/host_checkpoints.py, at 64 px and 4 steps set in
the page: the files unchanged), and the node rectangles of the live graph (`app.graph`) do not
overlap after the run. Screenshots go to
$VAEFIX_SCREENSHOTS (default: the test's temporary folder). Skipped by name without ComfyUI,
Playwright or Chromium."""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from host_checkpoints import generation_models
from host_family_vaes import family_vae, write_clip
from host_models import IMAGE, SMUGGLER
from host_server import PACK_FOLDER
from run_cli import ROOT

pytestmark = pytest.mark.host
CHROMIUM = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser"),
                             os.environ.get("VAEFIX_CHROMIUM")) if p), None)
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
VAE_ONLY = ["VAE Health Check", "Inspect a VAE for black holes", "Find the cell that smuggles",
            "Repair a latent before decoding", "Compare two VAEs"]
GENERATION = ["SD1.5 text to image with a swapped VAE", "SD1.5 text to image with a channel edit", "SD1.5 generate, check, repair, decode"]
VIDEO = ["Inspect a video VAE clip"]  # a Wan 2.1 VAE (random weights, the host's classes) and an animated clip
TITLE = 30  # px the frontend draws a node's title above its `pos`


@pytest.fixture(scope="module")
def page(host, tmp_path_factory):
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed")
    if CHROMIUM is None:
        pytest.skip("no Chromium: apt-get install chromium (the browser tests use the system browser)")
    shots = Path(os.environ.get("VAEFIX_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    shots.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        pg = browser.new_page(viewport={"width": 1600, "height": 1000})
        errors = []
        pg.on("pageerror", lambda e: errors.append(str(e)))
        pg.goto(host.url("/"))
        pg.wait_for_function("window.app && window.app.graph && window.LiteGraph", timeout=120_000)
        time.sleep(2)
        pg.keyboard.press("Escape")  # the first visit opens the template browser
        pg.shots, pg.page_errors = shots, errors
        yield pg
        browser.close()


def dialogs(page) -> list[str]:
    return page.evaluate("Array.from(document.querySelectorAll('.p-dialog')).map(d => d.innerText)")


def open_search(page):
    """Double-click an empty spot of the canvas, as a user does, until the node search opens."""
    box = page.get_by_placeholder("Search Nodes...")
    for _ in range(5):
        page.mouse.dblclick(800, 500)
        try:
            box.wait_for(timeout=3_000)
            return box
        except Exception:  # noqa: BLE001 - the canvas was still busy (a closing dialog): try again
            time.sleep(1)
    page.screenshot(path=str(page.shots / "search_failed.png"))
    raise AssertionError("double-clicking the canvas never opened the node search")


def test_every_node_is_found_by_search(host, page):
    ours = {k: v["display_name"] for k, v in host.get_json("/object_info").items() if k.startswith("VAEFix")}
    assert len(ours) >= 15
    page.evaluate("app.graph.clear()")
    time.sleep(1)
    for node_id, name in ours.items():
        box = open_search(page)
        box.fill(name)
        page.locator("li[role=option]").last.wait_for(timeout=10_000)
        time.sleep(0.5)  # results settle as the search runs
        found = [t.splitlines()[0].strip() for t in page.locator("li[role=option]").all_inner_texts() if t.strip()]
        assert found and found[0] == name, f"searching '{name}' ({node_id}) found {found[:3]}"
        page.keyboard.press("Escape")
        time.sleep(0.3)
    page.screenshot(path=str(page.shots / "search.png"))


def for_the_test(graph: dict, files: tuple = (SMUGGLER, IMAGE)) -> dict:
    """The tests' files (VAE, image) in place of the user's (as the API-twin host tests do); a
    text-to-image graph keeps its file names (the fixture built them) and is CPU-sized: 64 px, 4 steps."""
    generation = any(n["type"] == "KSampler" for n in graph["nodes"])
    for node in graph["nodes"]:
        values = node.get("widgets_values")
        if node["type"] == "VAEFixLoadVAE" and not generation:
            values[0] = files[0]
        elif node["type"] == "LoadImage":
            values[0] = files[1]
        elif node["type"] == "EmptyLatentImage":
            values[0] = values[1] = 64
        elif node["type"] == "KSampler":
            values[2] = 4  # seed, control, steps, cfg, sampler, scheduler, denoise
    return graph


def load(page, path: Path, for_run: bool = False, files: tuple = (SMUGGLER, IMAGE)) -> list[dict]:
    graph = json.loads(path.read_text())
    if for_run:
        graph = for_the_test(graph, files)
    page.evaluate("(g) => app.loadGraphData(g)", graph)
    time.sleep(1.5)
    return page.evaluate("app.graph._nodes.map(n => ({id: n.id, type: n.type, pos: [n.pos[0], n.pos[1]], "
                         "size: [n.size[0], n.size[1]], registered: !!LiteGraph.registered_node_types[n.type]}))")


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_every_ui_workflow_loads_without_missing_nodes_or_errors(page, path):
    before = len(page.page_errors)
    nodes = load(page, path)
    assert nodes and all(n["registered"] for n in nodes), [n["type"] for n in nodes if not n["registered"]]
    shown = [d for d in dialogs(page) if "missing" in d.lower() or "error" in d.lower()]
    assert not shown, shown
    assert page.page_errors[before:] == []
    page.screenshot(path=str(page.shots / f"{path.stem}.png"))


def overlaps(nodes: list[dict]) -> list[tuple]:
    rects = [(n["id"], n["type"], n["pos"][0], n["pos"][1] - TITLE, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
             for n in nodes]
    return [(a[:2], b[:2]) for i, a in enumerate(rects) for b in rects[i + 1:]
            if a[2] < b[4] and b[2] < a[4] and a[3] < b[5] and b[3] < a[5]]


def test_the_overlap_check_sees_an_overlap():
    a = {"id": 1, "type": "A", "pos": [0, 40], "size": [100, 100]}
    assert overlaps([a, {"id": 2, "type": "B", "pos": [50, 160], "size": [100, 100]}])  # its title bar hits a
    assert not overlaps([a, {"id": 2, "type": "B", "pos": [120, 40], "size": [100, 100]}])


def test_every_workflow_is_run_by_the_browser_test():
    assert sorted(VAE_ONLY + GENERATION + VIDEO) == [p.stem for p in WORKFLOWS]


@pytest.mark.parametrize("name", VAE_ONLY + GENERATION + VIDEO)
def test_workflows_run_from_the_page_and_nothing_overlaps_after(host, page, name):
    files = (SMUGGLER, IMAGE)
    if name in GENERATION:
        generation_models(host, "sd15")
    elif name in VIDEO:
        files = (family_vae(host, "wan21")[0], write_clip(host))
    load(page, ROOT / "workflows" / f"{name}.json", for_run=True, files=files)
    done_before = len(host.get_json("/history"))
    page.evaluate("app.queuePrompt(0, 1)")
    deadline = time.monotonic() + 600
    while len(host.get_json("/history")) <= done_before:
        assert time.monotonic() < deadline, f"{name} did not finish in 600 s"
        time.sleep(1)
    entry = list(host.get_json("/history").values())[-1]
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:2000]
    time.sleep(2)  # the previews arrive and nodes grow to show them
    nodes = page.evaluate("app.graph._nodes.map(n => ({id: n.id, type: n.type, pos: [n.pos[0], n.pos[1]], "
                          "size: [n.size[0], n.size[1]]}))")
    assert not overlaps(nodes), overlaps(nodes)
    assert not [d for d in dialogs(page) if "error" in d.lower()]
    page.screenshot(path=str(page.shots / f"{name}_after_run.png"))


def test_the_template_browser_shows_each_workflow_by_its_title(page):
    page.keyboard.press("Escape")
    page.locator(".side-bar-button", has_text="Templates").first.click()
    page.get_by_text(PACK_FOLDER, exact=True).first.click()  # the pack's entry in the browser's list
    titles = [p.stem for p in WORKFLOWS]
    page.get_by_text(titles[0], exact=True).first.wait_for(timeout=20_000)
    time.sleep(2)  # thumbnails load
    shown = page.locator(".p-dialog").first.inner_text()
    page.screenshot(path=str(page.shots / "templates.png"))
    page.keyboard.press("Escape")
    assert [t for t in titles if t not in shown] == [], shown[:2000]

"""The pack as a real ComfyUI server (CPU) presents it to the browser: nodes and tooltips, import
log, help pages, templates, and UI workflows that queue exactly their API twins.

Needs a ComfyUI checkout (`COMFYUI_PATH`, see tests/conftest.py); `.ci/run` points it at the
ComfyUI source beside the checkout.
"""
from __future__ import annotations

import io
import json
from urllib.parse import quote

import pytest
from PIL import Image

from host_server import API_WORKFLOWS, PACK_FOLDER, WORKFLOWS, assert_registered_with_tooltips
from run_cli import ROOT

NODE_IDS = ("VAEFixLoadVAE", "VAEFixFp16Fix", "VAEFixHealthCheck", "VAEFixInspectVAE", "VAEFixLogVarianceMap", "VAEFixLatentChannelEdit",
            "VAEFixLatentStatistics", "VAEFixLatentReachMap", "VAEFixLatentCellReach", "VAEFixLatentPreviewRGB",
            "VAEFixRepairLatent", "VAEFixCompareVAEs", "VAEFixConvertVAE", "VAEFixSafeVAEDecode", "VAEFixSafeVAEEncode")
FRONTEND_ONLY = {"Note", "MarkdownNote"}  # comments on the canvas: never queued
pytestmark = pytest.mark.host


def test_every_node_is_registered_with_tooltips(host):
    info = host.get_json("/object_info")
    assert_registered_with_tooltips(info, NODE_IDS, PACK_FOLDER)
    ours = {k for k, v in info.items() if v["python_module"] == f"custom_nodes.{PACK_FOLDER}"}
    assert ours == set(NODE_IDS), "the pack registers other nodes than the ones users' workflows name"


def test_pack_imported_without_errors(host):
    pack_lines = [line for line in host.log().splitlines() if PACK_FOLDER in line]
    assert any("seconds" in line and "IMPORT FAILED" not in line for line in pack_lines), "pack missing from import times"
    bad = [line for line in pack_lines if "IMPORT FAILED" in line or "Cannot import" in line or "Error while calling" in line]
    assert not bad, "\n".join(bad)


def test_help_pages_are_served_where_the_frontend_looks(host):
    for node_id in NODE_IDS:  # the frontend asks for docs/<node id>/<locale>.md, then docs/<node id>.md
        expected = (ROOT / "web" / "docs" / f"{node_id}.md").read_text()
        assert host.get(f"/extensions/{PACK_FOLDER}/docs/{node_id}/en.md").decode() == expected
        assert host.get(f"/extensions/{PACK_FOLDER}/docs/{node_id}.md").decode() == expected


def test_example_workflows_are_templates(host):
    listed = host.get_json("/api/workflow_templates")
    names = sorted(p.stem for p in WORKFLOWS.glob("*.json"))
    assert sorted(listed.get(PACK_FOLDER, [])) == names, listed  # the UI workflows, and nothing else
    for name in names:  # titles with spaces and commas: the frontend's fetch percent-encodes them
        ui = json.loads(host.get(f"/api/workflow_templates/{PACK_FOLDER}/{quote(name)}.json"))
        assert ui == json.loads((WORKFLOWS / f"{name}.json").read_text())
        thumb = Image.open(io.BytesIO(host.get(f"/api/workflow_templates/{PACK_FOLDER}/{quote(name)}.jpg")))
        assert thumb.format == "JPEG" and min(thumb.size) >= 64


def ui_to_api(ui: dict, object_info: dict) -> dict:
    """What the frontend queues for a UI-format workflow: links by node id and widget values by name."""
    links = {l[0]: l for l in ui["links"]}
    prompt = {}
    for node in ui["nodes"]:
        if node.get("mode", 0) != 0 or node["type"] not in object_info:
            continue
        spec = object_info[node["type"]]
        inputs = {i["name"]: [str(links[i["link"]][1]), links[i["link"]][2]] for i in node.get("inputs", []) if i.get("link") is not None}
        values = list(node.get("widgets_values", []))
        for section in ("required", "optional"):
            for name in spec["input_order"].get(section, []):
                kind, options = (spec["input"][section][name] + [{}])[:2]
                widget = isinstance(kind, list) or kind in ("COMBO", "INT", "FLOAT", "STRING", "BOOLEAN")
                if name in inputs or not widget or options.get("forceInput"):
                    continue
                inputs[name] = values.pop(0)
                if options.get("control_after_generate"):
                    values.pop(0)  # the "fixed/randomize" widget the frontend adds after a seed
                if options.get("image_upload"):
                    values.pop(0)  # the upload button's placeholder value
        assert not values, f"node {node['id']} ({node['type']}) has widget values no input takes: {values}"
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def test_ui_workflows_match_their_api_twins(host):
    info = host.get_json("/object_info")
    for ui_path in sorted(WORKFLOWS.glob("*.json")):
        ui = json.loads(ui_path.read_text())
        unknown = {n["type"] for n in ui["nodes"]} - set(info) - FRONTEND_ONLY
        assert not unknown, f"{ui_path.name} uses nodes the server does not know: {unknown}"
        twin = json.loads((API_WORKFLOWS / ui_path.name).read_text())
        assert ui_to_api(ui, info) == twin, f"{ui_path.name} and its API twin differ"

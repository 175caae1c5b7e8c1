"""The example workflows (UI format) laid out so that nothing overlaps, on load and after a run
(issue 14 item 1). Checked without ComfyUI, from the JSON alone, with the frontend's own sizes
(ComfyUI frontend / LiteGraph: title bar 30 px, slot row 20 px, widget 20 px plus 4 px margin).

The rules:
- A node occupies [x, y - 30, x + w, y + h] for pos [x, y] and size [w, h]: the title bar is drawn
  above pos. Two nodes' rectangles keep at least GAP = 20 px between them, along x or along y.
- A node's size holds its slots and widgets (estimated from its inputs, outputs and widget values)
  and, below them, the room for what it shows after a run, so that growing to show it never makes
  it overlap a neighbour:
  * nodes that show an image (PreviewImage, SaveImage, LoadImage, and every pack node that returns
    ui.PreviewImage, found in nodes/*.py): a preview area at least as tall as the node is wide
    (a square image at the node's full width; wider pictures fit too) and never under 256 px;
  * nodes that show text (PreviewAny, pack nodes returning ui.PreviewText): at least 200 px;
  * Note / MarkdownNote: their whole text, at about 6.5 px a character and 15 px a line.
- Data flows left to right: every node that feeds another lies wholly to its left (its right edge
  plus GAP at or before the other's left edge). Notes and reroutes are exempt.
- Every node, Notes included, lies inside a titled group, under the group's title (34 px at the
  default font size 24); groups do not overlap each other.
- Every workflow has a Note that says what a healthy VAE shows.
"""
from __future__ import annotations

import ast
import json
import math
import numpy as np
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))  # UI format; the API twins in workflows/api carry no positions

TITLE_H = 30          # LiteGraph.NODE_TITLE_HEIGHT: drawn above pos[1]
SLOT_H = 20           # LiteGraph.NODE_SLOT_HEIGHT: one row of inputs/outputs
WIDGET_H = 24         # LiteGraph.NODE_WIDGET_HEIGHT (20) plus its margin
MULTILINE_H = 80      # a multi-line text widget (a prompt)
BODY_PAD = 10
GAP = 20
IMAGE_MIN_H = 256
TEXT_MIN_H = 200
GROUP_TITLE_H = 34    # font_size 24 x 1.4
NOTE_CHAR_W, NOTE_LINE_H = 6.5, 15
NOTES = {"Note", "MarkdownNote"}
EXEMPT_FROM_FLOW = NOTES | {"Reroute", "PrimitiveNode"}
CORE_IMAGE = {"PreviewImage", "SaveImage", "LoadImage"}
CORE_TEXT = {"PreviewAny"}


def pack_preview_types() -> tuple[set[str], set[str]]:
    """(node ids that return ui.PreviewImage, node ids that return ui.PreviewText), read off nodes/*.py."""
    images, texts = set(), set()
    for path in sorted((REPO / "nodes").glob("*.py")):
        for cls in (n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ClassDef)):
            ids = [k.value.value for k in ast.walk(cls) if isinstance(k, ast.keyword) and k.arg == "node_id"
                   and isinstance(k.value, ast.Constant)]
            shown = {a.attr for a in ast.walk(cls) if isinstance(a, ast.Attribute)
                     and isinstance(a.value, ast.Name) and a.value.id == "ui"}
            if ids:
                images |= set(ids) if "PreviewImage" in shown else set()
                texts |= set(ids) if "PreviewText" in shown else set()
    return images, texts


PACK_IMAGE, PACK_TEXT = pack_preview_types()
SHOWS_IMAGE = CORE_IMAGE | PACK_IMAGE
SHOWS_TEXT = CORE_TEXT | PACK_TEXT


def widgets_height(node: dict) -> int:
    """The slots and widgets of a node, as the frontend stacks them under the title bar."""
    sockets = [i for i in node.get("inputs", []) if "widget" not in i]  # a widget turned socket sits on its widget's row
    rows = max(len(sockets), len(node.get("outputs", [])), 1)
    values = node.get("widgets_values") or []
    if isinstance(values, dict):  # some nodes store widgets by name
        values = list(values.values())
    widgets = sum(MULTILINE_H if isinstance(v, str) and ("\n" in v or len(v) > 40) else WIDGET_H for v in values)
    return rows * SLOT_H + widgets + BODY_PAD


def note_text_height(node: dict) -> int:
    text = "".join(v for v in node.get("widgets_values", []) if isinstance(v, str))
    per_line = max(1, int((node["size"][0] - 20) / NOTE_CHAR_W))
    lines = sum(max(1, math.ceil(len(line) / per_line)) for line in text.split("\n"))
    return lines * NOTE_LINE_H + 20


def required_height(node: dict) -> int:
    """The least size[1] that holds the node's widgets and what it shows after a run."""
    kind, width = node["type"], node["size"][0]
    if kind in NOTES:
        return note_text_height(node)
    shown = max(IMAGE_MIN_H, width) if kind in SHOWS_IMAGE else TEXT_MIN_H if kind in SHOWS_TEXT else 0
    return widgets_height(node) + shown


def rect(node: dict) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) on the canvas, title bar included; never less than the node needs."""
    (x, y), (w, h) = node["pos"][:2], node["size"][:2]
    return x, y - TITLE_H, x + w, y + max(h, required_height(node))


def apart(a, b, gap: float = GAP) -> bool:
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def label(node: dict) -> str:
    return f"node {node['id']} ({node.get('title') or node['type']})"


# ---------------------------------------------------------------- the checks, each a list of problems

def room_problems(wf: dict) -> list[str]:
    return [f"{label(n)} is {n['size'][1]} px tall, needs {required_height(n)} (widgets and what it shows)"
            for n in wf["nodes"] if n["size"][1] < required_height(n)]


def overlap_problems(wf: dict) -> list[str]:
    nodes = wf["nodes"]
    return [f"{label(a)} and {label(b)} overlap or are closer than {GAP} px: {rect(a)} / {rect(b)}"
            for i, a in enumerate(nodes) for b in nodes[i + 1:] if not apart(rect(a), rect(b))]


def flow_problems(wf: dict) -> list[str]:
    nodes = {n["id"]: n for n in wf["nodes"]}
    out = []
    for _, src, _, dst, _, _ in wf["links"]:
        a, b = nodes[src], nodes[dst]
        if a["type"] in EXEMPT_FROM_FLOW or b["type"] in EXEMPT_FROM_FLOW:
            continue
        if rect(a)[2] + GAP > rect(b)[0]:
            out.append(f"{label(b)} takes an input from {label(a)}, which is not to its left")
    return out


def group_problems(wf: dict) -> list[str]:
    groups = wf.get("groups", [])
    if not groups:
        return ["no groups"]
    out = [f"group {i} has no title" for i, g in enumerate(groups) if not str(g.get("title", "")).strip()]
    boxes = []
    for g in groups:
        x, y, w, h = g["bounding"]
        boxes.append((x, y, x + w, y + h))
    out += [f"groups {groups[i]['title']!r} and {groups[j]['title']!r} overlap"
            for i in range(len(boxes)) for j in range(i + 1, len(boxes)) if not apart(boxes[i], boxes[j], 0)]
    for n in wf["nodes"]:
        left, top, right, bottom = rect(n)
        if not any(gx <= left and gy + GROUP_TITLE_H <= top and right <= gx2 and bottom <= gy2 for gx, gy, gx2, gy2 in boxes):
            out.append(f"{label(n)} lies outside every group")
    return out


def note_problems(wf: dict) -> list[str]:
    texts = [" ".join(str(v) for v in n.get("widgets_values", [])) for n in wf["nodes"] if n["type"] in NOTES]
    if not texts:
        return ["no Note node"]
    return [] if any("healthy" in t.lower() for t in texts) else ["no Note says what a healthy VAE shows"]


CHECKS = (room_problems, overlap_problems, flow_problems, group_problems, note_problems)


# ---------------------------------------------------------------- the shipped workflows

def test_the_preview_nodes_are_found():
    assert {"VAEFixHealthCheck", "VAEFixInspectVAE", "VAEFixLogVarianceMap", "VAEFixLatentReachMap",
            "VAEFixLatentCellReach", "VAEFixRepairLatent", "VAEFixCompareVAEs"} <= PACK_IMAGE
    assert "VAEFixConvertVAE" in PACK_TEXT and "VAEFixLoadVAE" not in PACK_IMAGE | PACK_TEXT
    assert len(WORKFLOWS) >= 8


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_layout(path, check):
    wf = json.loads(path.read_text())
    assert check(wf) == [], f"{path.name}:\n" + "\n".join(check(wf))


# ---------------------------------------------------------------- the checks catch what they should

def node(id_, kind, pos, size, inputs=(), outputs=0, values=()):
    return {"id": id_, "type": kind, "pos": list(pos), "size": list(size), "widgets_values": list(values),
            "inputs": [{"name": f"in{i}", "link": link} for i, link in enumerate(inputs)],
            "outputs": [{"name": f"out{i}", "links": []} for i in range(outputs)]}


def synthetic(*nodes, links=(), groups=None) -> dict:
    boxes = [{"title": "All", "bounding": [-1000, -1000, 5000, 5000]}] if groups is None else groups
    return {"nodes": list(nodes), "links": [list(link) for link in links], "groups": boxes}


def test_a_clean_layout_passes():
    wf = synthetic(node(1, "VAEFixLoadVAE", (0, 0), (320, 120), outputs=2, values=["a.safetensors", "auto"]),
                   node(2, "VAEDecode", (400, 0), (220, 80), inputs=[1], outputs=1),
                   node(3, "Note", (0, 200), (320, 120), values=["A healthy VAE: nothing boxed."]),
                   links=[(1, 1, 0, 2, 0, "VAE")])
    assert [p for check in CHECKS for p in check(wf)] == []


def test_overlapping_nodes_are_caught():
    wf = synthetic(node(1, "VAEDecode", (0, 0), (220, 80)), node(2, "VAEDecode", (100, 40), (220, 80)))
    assert len(overlap_problems(wf)) == 1


def test_the_title_bar_and_the_gap_count():
    below = 80 + TITLE_H  # node 2's title bar would touch node 1's bottom edge
    assert overlap_problems(synthetic(node(1, "VAEDecode", (0, 0), (220, 80)), node(2, "VAEDecode", (0, below), (220, 80))))
    assert not overlap_problems(synthetic(node(1, "VAEDecode", (0, 0), (220, 80)),
                                          node(2, "VAEDecode", (0, below + GAP), (220, 80))))


def test_a_preview_without_room_is_caught():
    small = node(1, "PreviewImage", (0, 0), (320, 200), inputs=[None])  # room for its slot, not for the picture
    assert room_problems(synthetic(small)) and required_height(small) >= 320 + SLOT_H
    assert room_problems(synthetic(node(2, "VAEFixInspectVAE", (0, 0), (320, 300), inputs=[None, None], outputs=5)))
    assert room_problems(synthetic(node(3, "PreviewAny", (0, 0), (320, 120), inputs=[None])))
    # the preview grows the node after a run: below it a neighbour placed by the stated size overlaps
    grown = synthetic(small, node(4, "VAEDecode", (0, 200 + TITLE_H + GAP), (220, 80)))
    assert overlap_problems(grown)


def test_a_node_fed_from_its_right_is_caught():
    wf = synthetic(node(1, "VAEFixLoadVAE", (400, 0), (320, 120), outputs=2),
                   node(2, "VAEDecode", (0, 0), (220, 80), inputs=[1], outputs=1),
                   links=[(1, 1, 0, 2, 0, "VAE")])
    assert len(flow_problems(wf)) == 1
    wf["nodes"][1]["type"] = "Note"
    assert flow_problems(wf) == []


def test_a_node_outside_every_group_is_caught():
    wf = synthetic(node(1, "VAEDecode", (0, 0), (220, 80)), node(2, "VAEDecode", (600, 0), (220, 80)),
                   groups=[{"title": "Decode", "bounding": [-10, -10 - TITLE_H - GROUP_TITLE_H, 300, 200]}])
    assert group_problems(wf) == ["node 2 (VAEDecode) lies outside every group"]
    wf["groups"][0]["title"] = ""
    assert "group 0 has no title" in group_problems(wf)
    assert group_problems(synthetic(node(1, "VAEDecode", (0, 0), (220, 80)), groups=[])) == ["no groups"]


def test_a_workflow_without_a_useful_note_is_caught():
    assert note_problems(synthetic(node(1, "VAEDecode", (0, 0), (220, 80)))) == ["no Note node"]
    assert note_problems(synthetic(node(1, "MarkdownNote", (0, 0), (320, 100), values=["Queue it."])))


def test_a_strip_of_panels_is_rewrapped_into_a_card():
    """Template thumbnails (tests/host_prompts.card): a wide strip reads at card size in rows."""
    from host_prompts import card

    strip = np.full((40, 3 * 40 + 2 * 6 + 6 + 10, 3), 255, np.uint8)  # white, as the pack's pictures
    for i, colour in enumerate(((200, 0, 0), (0, 200, 0), (0, 0, 200))):
        strip[4:, i * 46:i * 46 + 40] = colour  # under a label band
    strip[5:35, 3 * 46:3 * 46 + 4] = 0  # a colour bar: narrow pieces that belong to the last panel
    strip[10:12, 3 * 46 + 7:3 * 46 + 10] = 0
    out = card(strip)
    assert out.shape[0] == 2 * 40 + 6 and out.shape[1] < strip.shape[1]  # two rows, narrower
    assert (out[4:40, :40] == (200, 0, 0)).all() and (out[4:40, 46:86] == (0, 200, 0)).all()
    assert (out[50:, :40] == (0, 0, 200)).all() and (out[46:, 46:50] == strip[:, 138:142]).all()
    square = np.zeros((64, 64, 3), np.uint8)
    assert card(square) is square  # not a strip: left as it is

"""The pack as ComfyUI sees its files, checked without ComfyUI: import guard, layering, help pages,
workflows, and the pure-torch conversions between ComfyUI wire types and engine tensors."""
from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
NODE_FILES = sorted((REPO / "nodes").glob("*.py"))
HOST_ONLY = ("comfy", "folder_paths", "comfy_extras", "comfy_execution", "nodes", "server", "execution")


def load_pack(name: str = "vae_fix_pack_under_test"):
    """Import the repository the way ComfyUI does: as a package named after its folder."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "__init__.py", submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(level, module) of every import statement in a file (level > 0: relative)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(0, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            out.append((node.level, node.module or ""))
    return out


def node_ids() -> list[str]:
    ids = []
    for path in NODE_FILES:
        ids += re.findall(r'node_id="([^"]+)"', path.read_text())
    return ids


def test_pack_imports_outside_comfyui_and_registers_nothing():
    pack = load_pack()
    assert pack.WEB_DIRECTORY == "./web"
    assert (REPO / "web").is_dir()
    assert not hasattr(pack, "NODE_CLASS_MAPPINGS"), "a V1 mapping would make ComfyUI ignore the V3 entry point"
    assert not hasattr(pack, "comfy_entrypoint"), "without comfy_api there is nothing to register"


def test_only_host_module_touches_comfyui_internals():
    for path in NODE_FILES:
        for level, module in imports_of(path):
            root = module.split(".")[0]
            if level == 0 and root in HOST_ONLY:
                assert path.name.startswith("host"), f"{path.name} imports {module}: only the host adapter may touch the host"
            if level == 0 and root == "vae_fix":
                pytest.fail(f"{path.name} imports vae_fix absolutely; inside ComfyUI the pack is imported "
                            "under its folder name, so use `from ..vae_fix import ...`")


def test_every_node_has_a_prefixed_id_and_a_help_page():
    ids = node_ids()
    assert "VAEFixLoadVAE" in ids and "VAEFixInspectVAE" in ids and "VAEFixLogVarianceMap" in ids
    assert len(ids) == len(set(ids))
    for node_id in ids:
        assert node_id.startswith("VAEFix"), node_id
        page = REPO / "web" / "docs" / f"{node_id}.md"
        assert page.is_file(), f"missing help page {page.relative_to(REPO)}"
        text = page.read_text()
        localized = REPO / "web" / "docs" / node_id / "en.md"  # asked for first; the flat page serves other locales
        assert localized.is_file() and localized.read_text() == text, f"{localized.relative_to(REPO)} differs from {page.name}"
        assert text.startswith("# ") and len(text) > 400, f"{page.name} is too thin to help anyone"


def test_node_modules_list_matches_files():
    nodes_init = (REPO / "nodes" / "__init__.py").read_text()
    listed = re.search(r"NODE_MODULES = \[(.*?)\]", nodes_init).group(1)
    for name in re.findall(r'"(\w+)"', listed):
        assert (REPO / "nodes" / f"{name}.py").is_file(), name


# ---------------------------------------------------------------- conversions

@pytest.fixture(scope="module")
def convert():
    load_pack()
    return importlib.import_module("vae_fix_pack_under_test.nodes.wire")


@pytest.fixture(scope="module")
def InputError():
    """The pack's own error class (the pack imports its engine under the pack's name)."""
    load_pack()
    return importlib.import_module("vae_fix_pack_under_test.vae_fix.errors").InputError


def test_image_to_engine_layout_and_alpha(convert):
    image = torch.rand(2, 5, 7, 4)
    before = image.clone()
    x = convert.image_to_engine(image)
    assert x.shape == (2, 3, 5, 7)
    assert torch.equal(x[1, 2], image[1, :, :, 2])
    assert torch.equal(image, before)
    gray = convert.image_to_engine(torch.rand(1, 4, 4, 1))
    assert gray.shape == (1, 3, 4, 4) and torch.equal(gray[0, 0], gray[0, 2])


@pytest.mark.parametrize("bad", [torch.rand(4, 4), torch.rand(1, 4, 4, 2), "image"])
def test_image_to_engine_rejects_what_is_not_an_image(convert, InputError, bad):
    with pytest.raises(InputError, match="Invalid image"):
        convert.image_to_engine(bad)


def test_engine_to_image_round_trip(convert):
    image = torch.rand(3, 6, 10, 3)
    assert torch.equal(convert.engine_to_image(convert.image_to_engine(image)), image)
    assert convert.engine_to_image(torch.rand(3, 4, 5)).shape == (1, 4, 5, 3)


def test_images_to_batch_pads_different_sizes(convert):
    batch = convert.images_to_batch([torch.ones(3, 4, 6), torch.full((3, 8, 2), 0.5)])
    assert batch.shape == (2, 8, 6, 3)
    assert batch[0, :4].min() == 1 and batch[0, 4:].max() == 0
    assert batch[1, :, :2].min() == 0.5 and batch[1, :, 2:].max() == 0


def test_latent_helpers_keep_other_keys(convert, InputError):
    mask = torch.ones(1, 8, 8)
    latent = {"samples": torch.zeros(1, 4, 8, 8), "noise_mask": mask, "batch_index": [3]}
    out = convert.with_samples(latent, torch.ones(1, 4, 8, 8))
    assert out["noise_mask"] is mask and out["batch_index"] == [3]
    assert latent["samples"].sum() == 0
    with pytest.raises(InputError, match="latent"):
        convert.latent_samples({"samples": torch.zeros(4, 8, 8)})


# ---------------------------------------------------------------- workflows

WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))  # UI format, served as templates
API_WORKFLOWS = REPO / "workflows" / "api"                # their API-format twins


def test_every_workflow_has_a_thumbnail_and_an_api_twin():
    assert WORKFLOWS, "no example workflows"
    for ui in WORKFLOWS:
        assert "nodes" in json.loads(ui.read_text()), f"{ui.name} is not a UI-format workflow"
        assert ui.with_suffix(".jpg").is_file(), f"{ui.name} has no thumbnail"
        assert (API_WORKFLOWS / ui.name).is_file(), f"{ui.name} has no API-format twin"
    assert sorted(p.name for p in API_WORKFLOWS.glob("*.json")) == [p.name for p in WORKFLOWS], "API twin without a UI workflow"


def test_workflow_names_read_as_titles():
    """The template browser shows a pack's file names as the cards' titles (frontend 1.27:
    getTemplateTitle falls back to the name for custom nodes), so each name is the title."""
    for ui in WORKFLOWS:
        title = ui.stem
        assert "_" not in title and title[0].isupper() and len(title) <= 40, f"{ui.name} is not a readable title"
        assert all(c.isalnum() or c in " .,-" for c in title), f"{ui.name}: keep titles to words and . , -"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_ui_workflow_is_consistent(path):
    wf = json.loads(path.read_text())
    nodes = {n["id"]: n for n in wf["nodes"]}
    assert wf["last_node_id"] >= max(nodes) and "version" in wf
    for link_id, src, src_slot, dst, dst_slot, kind in wf["links"]:
        assert src in nodes and dst in nodes, f"link {link_id} joins missing nodes"
        assert link_id in nodes[src]["outputs"][src_slot]["links"]
        assert nodes[dst]["inputs"][dst_slot]["link"] == link_id
        assert kind == nodes[src]["outputs"][src_slot]["type"]
        assert nodes[dst]["inputs"][dst_slot]["type"] in (kind, "*")  # "*": an input that takes any type
    api = json.loads((API_WORKFLOWS / path.name).read_text())
    ours = {n["type"] for n in wf["nodes"] if n["type"].startswith("VAEFix")}
    assert ours <= {n["class_type"] for n in api.values()}

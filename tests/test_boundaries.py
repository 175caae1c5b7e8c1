"""The engine never imports ComfyUI, and in nodes/ only the host adapter touches the host: its
modules, and the attributes of its models (checked on the source with `ast`, so the rule can fail)."""
from __future__ import annotations

import ast
import subprocess
import sys

from run_cli import ROOT

HOST_MODULES = {"comfy", "comfy_api", "comfy_extras", "comfy_execution", "folder_paths", "nodes", "server",
                "execution", "latent_preview", "node_helpers"}
HOST_ATTRIBUTES = {"first_stage_model", "patcher", "memory_used_encode", "memory_used_decode", "vae_dtype",
                   "spacial_compression_encode", "output_device", "disable_offload", "upscale_ratio", "downscale_ratio"}
HOST_ADAPTER = {"host.py", "host_codec.py", "host_families.py", "host_loading.py", "host_fp16.py", "host_variants.py"}  # the host adapter: host.py, and beside it the codec, the family table, strict loading, the fp16 fix and the study's variants of the host's models
NODE_API = {"comfy_api"}  # node modules declare their schema with comfy_api.v0_0_2.io (a pinned API version): that is the node API, not internals


def imported_roots(path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def host_attributes(path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    return {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr in HOST_ATTRIBUTES}


def test_the_engine_source_imports_nothing_of_comfyui():
    for path in sorted((ROOT / "vae_fix").rglob("*.py")):
        bad = imported_roots(path) & HOST_MODULES
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}: the engine must run without ComfyUI"


def test_importing_every_engine_module_loads_no_comfyui():
    code = ("import importlib, pkgutil, sys, vae_fix, vae_fix.commands, vae_fix.builders\n"
            "for pkg in (vae_fix, vae_fix.commands, vae_fix.builders):\n"
            "    for m in pkgutil.iter_modules(pkg.__path__):\n"
            "        if m.name != '__main__': importlib.import_module(pkg.__name__ + '.' + m.name)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in %r))" % sorted(HOST_MODULES))
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", f"importing the engine loaded {r.stdout.strip()}"


def test_only_the_host_adapter_touches_host_modules_and_model_attributes():
    for path in sorted((ROOT / "nodes").glob("*.py")):
        if path.name in HOST_ADAPTER:
            if path.name == "host.py":
                assert host_attributes(path), "the rule checks nothing: host.py no longer reads host model attributes"
            continue
        bad = (imported_roots(path) & HOST_MODULES) - NODE_API
        assert not bad, f"nodes/{path.name} imports {sorted(bad)}: only nodes/host.py may"
        touched = host_attributes(path)
        assert not touched, f"nodes/{path.name} reads host model attributes {sorted(touched)}: only nodes/host.py may"

"""Fixtures shared by the test files: one real ComfyUI server for the whole session.

Every test that asks for `host` (directly or through `tiny_sd15`) runs inside that server; without
`COMFYUI_PATH` such tests are skipped at collection, each by name. `.ci/run` sets COMFYUI_PATH to
the ComfyUI source beside the checkout, so in CI they all run.
"""
from __future__ import annotations

import os
import sys

import pytest

COMFYUI_PATH = os.environ.get("COMFYUI_PATH")


def pytest_collection_modifyitems(config, items):
    if COMFYUI_PATH:
        return
    for item in items:
        if "host" in item.fixturenames:
            item.add_marker(pytest.mark.skip(reason=f"COMFYUI_PATH not set: host test {item.name} skipped"))


@pytest.fixture(scope="session")
def host(tmp_path_factory):
    """The session's ComfyUI server (a `host_server.HostServer`), with every test model in its folders."""
    from host_models import build_models
    from host_server import HostServer

    server = HostServer(COMFYUI_PATH, tmp_path_factory.mktemp("comfyui_base"),
                        os.environ.get("COMFYUI_PYTHON") or sys.executable)
    server.lay_out()
    build_models(server)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tiny_sd15(host) -> str:
    """Name of a tiny SD1.5-layout checkpoint (no VAE inside) in the server's models/checkpoints."""
    from host_models import build_tiny_sd15

    return build_tiny_sd15(host)

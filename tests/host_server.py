"""A real ComfyUI server on the CPU with this pack installed, for the host tests.

The server runs from a ComfyUI checkout (`COMFYUI_PATH`) with its own Python (`COMFYUI_PYTHON`,
default: this interpreter), in a temporary base directory whose custom_nodes/ holds a symlink to
this repository, on a free port, with an in-memory database. Its log goes to a file the tests read.
"""
from __future__ import annotations

import base64
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

from run_cli import ROOT

REPO = ROOT  # the older name, kept for the suites that use it
PACK_FOLDER = "ComfyUI-VAE-Fix"  # the folder name a user's git clone gets
START_TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class HostError(RuntimeError):
    """The server did not start, or answered something unexpected."""


class HostServer:
    def __init__(self, comfy_path, base_dir, python: str | None = None):
        self.comfy_path = Path(comfy_path)
        self.base = Path(base_dir)
        self.python = python or sys.executable
        self.port = free_port()
        self.log_path = self.base / "comfyui.log"
        self.proc: subprocess.Popen | None = None
        self.client_id = uuid.uuid4().hex

    # ------------------------------------------------------------ folders
    @property
    def vae_dir(self) -> Path:
        return self.base / "models" / "vae"

    @property
    def input_dir(self) -> Path:
        return self.base / "input"

    @property
    def output_dir(self) -> Path:
        return self.base / "output"

    @property
    def temp_dir(self) -> Path:
        return self.base / "temp"

    @property
    def checkpoints_dir(self) -> Path:
        return self.base / "models" / "checkpoints"

    @property
    def pack_dir(self) -> Path:
        return self.base / "custom_nodes" / PACK_FOLDER

    def lay_out(self) -> None:
        """The base directory's folders, and the pack symlinked into custom_nodes/ as a user's clone."""
        for d in ("custom_nodes", "models/vae", "models/vae_approx", "models/checkpoints", "input", "output", "temp", "user"):
            (self.base / d).mkdir(parents=True, exist_ok=True)
        if not self.pack_dir.exists():
            self.pack_dir.symlink_to(ROOT, target_is_directory=True)

    _lay_out = lay_out  # the older name

    # ------------------------------------------------------------ life cycle
    def start(self, timeout: float = START_TIMEOUT_S) -> "HostServer":
        self.lay_out()
        cmd = [self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(self.base), "--database-url", "sqlite:///:memory:"]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=self.comfy_path, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise HostError(f"ComfyUI exited with code {self.proc.returncode} while starting:\n{self.log_tail()}")
            try:
                self.get_json("/system_stats", timeout=2)
                return self
            except (OSError, HostError):
                time.sleep(0.5)
        self.stop()
        raise HostError(f"ComfyUI did not answer within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=20)
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    # ------------------------------------------------------------ HTTP
    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def get(self, path: str, timeout: float = 30) -> bytes:
        try:
            with urllib.request.urlopen(self.url(path), timeout=timeout) as r:
                return r.read()
        except urllib.error.HTTPError as e:
            raise HostError(f"GET {path}: HTTP {e.code}: {e.read()[:500]!r}") from None

    def get_json(self, path: str, timeout: float = 30):
        return json.loads(self.get(path, timeout))

    def post_json(self, path: str, data, timeout: float = 30) -> tuple[int, dict]:
        req = urllib.request.Request(self.url(path), data=json.dumps(data).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                body = r.read()
                return r.status, (json.loads(body) if body else {})
        except urllib.error.HTTPError as e:
            body = e.read()
            try:
                return e.code, json.loads(body)
            except json.JSONDecodeError:
                return e.code, {"error": body.decode(errors="replace")}

    # ------------------------------------------------------------ prompts
    def queue(self, prompt: dict) -> str:
        """POST /prompt; returns the prompt id, or raises with the server's validation errors."""
        status, body = self.post_json("/prompt", {"prompt": prompt, "client_id": self.client_id})
        if status != 200 or "prompt_id" not in body:
            raise HostError(f"prompt rejected (HTTP {status}): {json.dumps(body)[:2000]}")
        return body["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 300) -> dict:
        """The history entry of a finished prompt (success, error or interrupted)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.get_json(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("status_str") in ("success", "error"):
                return entry
            if not self.alive():
                raise HostError(f"ComfyUI died while running {prompt_id}:\n{self.log_tail()}")
            time.sleep(0.25)
        raise HostError(f"prompt {prompt_id} did not finish within {timeout:.0f} s:\n{self.log_tail()}")

    def run(self, prompt: dict, timeout: float = 300) -> dict:
        return self.wait(self.queue(prompt), timeout)

    def interrupt(self) -> None:
        self.post_json("/interrupt", {})

    def output_file(self, item: dict) -> Path:
        """Path of an image entry ({filename, subfolder, type}) from a history's outputs."""
        root = {"output": self.output_dir, "temp": self.temp_dir, "input": self.input_dir}[item["type"]]
        return root / item.get("subfolder", "") / item["filename"]

    def view(self, item: dict) -> bytes:
        """The bytes /view serves for an image entry, as the browser would fetch them."""
        return self.get("/view?" + urllib.parse.urlencode(
            {"filename": item["filename"], "subfolder": item.get("subfolder", ""), "type": item["type"]}))


    def events(self) -> "EventStream":
        """The websocket messages (progress, executing, ...) the server sends to this client."""
        return EventStream(self.port, self.client_id)

class EventStream:
    """A minimal websocket client (RFC 6455, text frames) collecting ComfyUI's JSON messages.

    The standard library has no websocket client, and the browser's view of a run (progress bar,
    which node runs) only exists on this socket.
    """

    def __init__(self, port: int, client_id: str):
        self.messages: list[dict] = []
        self.texts: list[tuple[str, str]] = []  # (node id, text) of binary TEXT events
        self._lock = threading.Lock()
        self._sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        key = base64.b64encode(os.urandom(16)).decode()
        self._sock.sendall((f"GET /ws?clientId={client_id} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                            f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                            "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += self._sock.recv(1)
        if b" 101 " not in head.split(b"\r\n")[0]:
            raise HostError(f"websocket upgrade refused: {head[:200]!r}")
        self._sock.settimeout(None)
        self._thread = threading.Thread(target=self._read_loop, daemon=True)
        self._thread.start()

    def _exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self._sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("websocket closed")
            data += chunk
        return data

    def _frame(self) -> tuple[int, bool, bytes]:
        b1, b2 = self._exact(2)
        n = b2 & 0x7F
        if n == 126:
            n = struct.unpack(">H", self._exact(2))[0]
        elif n == 127:
            n = struct.unpack(">Q", self._exact(8))[0]
        mask = self._exact(4) if b2 & 0x80 else None
        data = self._exact(n)
        if mask:
            data = bytes(c ^ mask[i % 4] for i, c in enumerate(data))
        return b1 & 0x0F, bool(b1 & 0x80), data

    def _read_loop(self) -> None:
        parts, kind = [], None
        try:
            while True:
                opcode, fin, data = self._frame()
                if opcode == 8:
                    return
                if opcode in (1, 2):
                    kind, parts = opcode, [data]
                elif opcode == 0:
                    parts.append(data)
                if fin and kind == 1 and opcode in (0, 1):
                    with self._lock:
                        self.messages.append(json.loads(b"".join(parts)))
                elif fin and kind == 2 and opcode in (0, 2):
                    self._binary(b"".join(parts))
        except (OSError, ConnectionError, ValueError):
            return

    def _binary(self, data: bytes) -> None:
        """ComfyUI's binary events: 4-byte type; TEXT (3) is a node's progress text (4-byte id length, id, text)."""
        if len(data) >= 8 and struct.unpack(">I", data[:4])[0] == 3:
            n = struct.unpack(">I", data[4:8])[0]
            with self._lock:
                self.texts.append((data[8:8 + n].decode(), data[8 + n:].decode(errors="replace")))

    def of(self, kind: str, prompt_id: str | None = None) -> list[dict]:
        """The data of every message of one type (optionally of one prompt), in arrival order."""
        with self._lock:
            return [m["data"] for m in self.messages if m.get("type") == kind
                    and (prompt_id is None or m.get("data", {}).get("prompt_id") == prompt_id)]

    def wait_for(self, test, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not test():
            if time.monotonic() > deadline:
                raise HostError("expected websocket message did not arrive")
            time.sleep(0.05)

    def close(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()


def status_messages(entry: dict) -> dict:
    """{event name: data} of a history entry's status messages (execution_error, execution_interrupted, ...)."""
    return {name: data for name, data in entry.get("status", {}).get("messages", [])}


# ---------------------------------------------------------------- helpers the host tests share

WORKFLOWS = ROOT / "workflows"          # UI format: what users drag in, served as templates
API_WORKFLOWS = WORKFLOWS / "api"       # API-format twins (a subfolder: the template glob skips it)


def api_workflow(name: str) -> dict:
    return json.loads((API_WORKFLOWS / f"{name}.json").read_text())


def node_of(prompt: dict, class_type: str) -> dict:
    """The one node of a class (asserted unique)."""
    found = [n for n in prompt.values() if n["class_type"] == class_type]
    assert len(found) == 1, f"expected one {class_type} in the workflow"
    return found[0]


def id_of(prompt: dict, class_type: str) -> str:
    """The id of the first node of a class."""
    found = [k for k, n in prompt.items() if n["class_type"] == class_type]
    assert found, f"expected a {class_type} in the workflow"
    return found[0]


def succeeded(entry: dict) -> dict:
    messages = status_messages(entry)
    assert entry["status"]["status_str"] == "success", json.dumps(messages.get("execution_error", messages), indent=1)[:3000]
    return entry["outputs"]


def failed(entry: dict) -> dict:
    assert entry["status"]["status_str"] == "error", "the prompt was expected to fail"
    return status_messages(entry)["execution_error"]


def interrupt_after_progress(server: "HostServer", prompt: dict, node_id: str, steps: int = 2,
                             texts: list | None = None) -> tuple[dict, list]:
    """Queue `prompt`, wait until `node_id` reported `steps` progress steps, POST /interrupt and wait.

    Returns the history entry and every progress event the node sent (watched on the websocket);
    the texts the node showed are appended to `texts`."""
    events = server.events()
    try:
        prompt_id = server.queue(prompt)
        progress = lambda: [p for p in events.of("progress", prompt_id) if p["node"] == node_id]
        events.wait_for(lambda: any(p["value"] >= steps for p in progress()), timeout=300)
        server.interrupt()
        entry = server.wait(prompt_id)
        if texts is not None:
            texts.extend(t for n, t in events.texts if n == node_id)
        return entry, progress()
    finally:
        events.close()


def assert_registered_with_tooltips(object_info: dict, node_ids, pack_folder: str) -> None:
    """Every node is in /object_info, from this pack, under VAE Fix/, with a tooltip on every input and output."""
    for node_id in node_ids:
        assert node_id in object_info, f"{node_id} is not registered"
        node = object_info[node_id]
        assert node["python_module"] == f"custom_nodes.{pack_folder}"
        assert node["category"].startswith("VAE Fix/") and node["display_name"] and node["description"]
        for section in ("required", "optional"):
            for name, (_, options) in node["input"].get(section, {}).items():
                assert options.get("tooltip"), f"{node_id} input {name} has no tooltip"
        assert node["output_tooltips"] and all(node["output_tooltips"]), f"{node_id} has an output without tooltip"


def images_of(server: "HostServer", outputs: dict, node_id: str) -> list:
    """The images a node wrote (SaveImage/PreviewImage or a node's own preview), as uint8 arrays."""
    import io

    import numpy as np
    from PIL import Image

    return [np.asarray(Image.open(io.BytesIO(server.view(item))).convert("RGB")) for item in outputs[node_id]["images"]]


def __getattr__(name: str):
    """Builders that moved to host_models.py, still importable from here."""
    if name in ("build_tiny_sd15", "taesd_state_dicts", "TINY_SD15_SCRIPT"):
        import host_models
        return getattr(host_models, name)
    raise AttributeError(name)

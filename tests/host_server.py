"""A real ComfyUI server on the CPU with this pack installed, for the host tests.

The server runs from a ComfyUI checkout (`COMFYUI_PATH`) with its own Python (`COMFYUI_PYTHON`,
default: this interpreter), in a temporary base directory whose custom_nodes/ holds a symlink to
this repository, on a free port, with an in-memory database. Its log goes to a file the tests read.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
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
    def pack_dir(self) -> Path:
        return self.base / "custom_nodes" / PACK_FOLDER

    def _lay_out(self) -> None:
        for d in ("custom_nodes", "models/vae", "models/vae_approx", "models/checkpoints", "input", "output", "temp", "user"):
            (self.base / d).mkdir(parents=True, exist_ok=True)
        if not self.pack_dir.exists():
            self.pack_dir.symlink_to(REPO, target_is_directory=True)

    # ------------------------------------------------------------ life cycle
    def start(self, timeout: float = START_TIMEOUT_S) -> "HostServer":
        self._lay_out()
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
            history = self.get_json(f"/history/{prompt_id}")
            entry = history.get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None and self._finished(entry):
                return entry
            if not self.alive():
                raise HostError(f"ComfyUI died while running {prompt_id}:\n{self.log_tail()}")
            time.sleep(0.25)
        raise HostError(f"prompt {prompt_id} did not finish within {timeout:.0f} s:\n{self.log_tail()}")

    @staticmethod
    def _finished(entry: dict) -> bool:
        return entry["status"].get("status_str") in ("success", "error")

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


def status_messages(entry: dict) -> dict:
    """{event name: data} of a history entry's status messages (execution_error, execution_interrupted, ...)."""
    return {name: data for name, data in entry.get("status", {}).get("messages", [])}

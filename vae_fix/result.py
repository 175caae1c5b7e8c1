"""The one shape every engine feature returns: a result that knows its JSON, summary and pictures.

Nodes and CLI commands never assemble a feature's output themselves: a node hands `to_json()`,
`summary()` and `pictures()` to its outputs, a command writes them with `write_result`.
Pictures are engine images `[3, H, W]` float32 in 0..1, or lists of them (one per batch item).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .errors import InputError
from .jsonsafe import json_safe

Picture = torch.Tensor  # [3, H, W] float32 in 0..1


class Result:
    """Base of every feature's result. Subclasses are dataclasses that override the three views."""

    #: file stem of the JSON the CLI writes (report.json, stats.json, ...)
    json_name = "result"

    def to_json(self) -> dict:
        raise NotImplementedError

    def summary(self) -> str:
        return ""

    def pictures(self) -> dict[str, Picture | list[Picture]]:
        """Named pictures; a list holds one picture per image or latent of the batch."""
        return {}

    def json_text(self) -> str:
        """Strict JSON (non-finite numbers become null), as nodes output it and the CLI writes it."""
        return json.dumps(json_safe(self.to_json()), indent=2, allow_nan=False)


def picture_files(pictures: dict) -> dict[str, Picture]:
    """{file stem: picture}: a list `name: [a, b]` becomes `name_0`, `name_1` (or just `name` for one)."""
    files = {}
    for name, pic in pictures.items():
        if isinstance(pic, (list, tuple)):
            for i, p in enumerate(pic):
                files[name if len(pic) == 1 else f"{name}_{i}"] = p
        else:
            files[name] = pic
    return files


def check_out_dir(path, flag: str = "--out") -> Path:
    """Refuse an output path that is an existing file, before any work is done."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise InputError(flag, f"'{out}' is an existing file", "a folder (created when missing)")
    return out


def write_result(result: Result, out_dir, extra_files: dict | None = None) -> dict[str, str]:
    """Write `<json_name>.json`, `summary.txt` and one PNG per picture into `out_dir`, all at once:
    everything goes to a temporary folder beside it first, so a failing run leaves nothing half-written.
    `extra_files`: {file name: writer(path)} for other outputs (latents, moments). Returns {name: path}."""
    from .images import save_png

    out = check_out_dir(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        names = {stem: save_png(pic, stage / f"{stem}.png").name for stem, pic in picture_files(result.pictures()).items()}
        for name, writer in (extra_files or {}).items():
            writer(stage / name)
            names[Path(name).stem] = name
        data = json_safe(result.to_json())
        data["files"] = {k: str(out / v) for k, v in names.items()}
        (stage / f"{result.json_name}.json").write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")
        (stage / "summary.txt").write_text(result.summary() + "\n")
        out.mkdir(exist_ok=True)
        for f in stage.iterdir():
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return data["files"]


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_file_atomically(out, write) -> Path:
    """`write(path)` into a temporary file beside `out`, then renamed to `out`: a failing write
    leaves nothing behind. The temporary name keeps `out`'s suffix (writers check it)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=out.suffix, dir=out.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a written file gets the usual mode
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return out

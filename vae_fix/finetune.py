"""Fix a VAE without breaking its latents: retrain the encoder so no cell's log-variance collapses,
with the decoder frozen and the latent means held where they were.

A diffusion model trained on a VAE's latents reads the posterior means; the decoder turns them back
into pixels. Both must stay as they are, so the student (a copy of the encoder and `quant_conv`)
learns, on random crops of the given images, to give the original's means and the original's
log-variance everywhere except where it sits below a floor, which it lifts to the floor:

    loss = mean_weight * mean((mu - mu_0)^2) / var(mu_0)          the means stay
         + mean over cells above the floor of (logvar - logvar_0)^2    the posterior stays
         + mean over cells below it of (logvar - floor)^2              collapsed cells are lifted

(the last term averages over the collapsed cells alone: they are a few in thousands).

The floor defaults to the original's typical log-variance (the detector's robust centre over the
evaluation images) minus `margin` nats, inside the detector's minimum drop, so a lifted cell is no
longer an anomaly. Before and after, the same evaluation images give the verdict, the deepest
anomaly, clamp-floor hits, the reach of the worst cell of before (same cell, same image: the
decoder is frozen, so this says whether the decoder still leans on that cell) and the drift of
the means and of the decoded pictures. Data-parallel under `torchrun` (`distributed.py`).
"""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch

from .anomaly import DEFAULT_MIN_DROP, LOGVAR_MIN, min_map, vae_baseline
from .codec import model_codec
from .distributed import World
from .errors import InputError, check_rules
from .inspect import inspect_vae
from .model import AutoencoderKL
from .progress import ProgressFn, Steps
from .result import Result
from .train_data import centre_square, random_crops
from .train_eval import model_reach_map, psnr
from .verdict import FAR_REACH


@dataclass(frozen=True)
class FinetuneSettings:
    steps: int = 200
    batch: int = 8
    crop: int = 128
    lr: float = 1e-4
    mean_weight: float = 10.0          # how hard the means are held (relative to the log-variance term)
    floor: Optional[float] = None      # None: typical log-variance - margin
    margin: float = DEFAULT_MIN_DROP / 2
    seed: int = 0
    eval_size: int = 256               # evaluation images: centre squares of this side
    eval_images: int = 8

    def check(self) -> "FinetuneSettings":
        rules = [("steps", self.steps >= 1, "at least 1"), ("batch", 1 <= self.batch <= 256, "1 to 256"),
                 ("crop", 32 <= self.crop <= 1024, "32 to 1024 pixels"), ("lr", 0 < self.lr < 1, "between 0 and 1"),
                 ("mean_weight", self.mean_weight > 0, "above 0"), ("margin", 0 <= self.margin <= 30, "0 to 30 nats"),
                 ("eval_size", 32 <= self.eval_size <= 2048, "32 to 2048 pixels"),
                 ("eval_images", 1 <= self.eval_images <= 64, "1 to 64")]
        check_rules(self, rules)
        return self


@dataclass
class FinetuneResult(Result):
    json_name = "finetune"
    settings: FinetuneSettings
    floor: float
    before: dict
    after: dict
    drift: dict
    history: list
    pictures_before: torch.Tensor     # [3, H, W] the Health Check's verdict picture, before
    pictures_after: torch.Tensor
    model: Optional[AutoencoderKL] = None
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {"settings": asdict(self.settings), "floor": self.floor, "before": self.before, "after": self.after,
                "drift": self.drift, "history": self.history, "seconds": self.seconds}

    def summary(self) -> str:
        d = self.drift
        decoded = "" if d["decoded_psnr_db"] is None else f"; decoded pictures {d['decoded_psnr_db']:.1f} dB from before"
        lines = [f"before: {_line(self.before)}", f"after:  {_line(self.after)}",
                 f"latent means moved {d['mean_rms_over_std']:.4f} of their spread (rms), at most "
                 f"{d['mean_max_abs']:.3g}{decoded}; log-variance floor {self.floor:.2f}; "
                 f"{self.settings.steps} steps in {self.seconds:.0f} s"]
        reach = self.after["reach_at_worst_cell"]
        if reach is not None and reach["over_median"] >= FAR_REACH:  # measured on an emergent hole: it stays
            lines.append(f"note: cell {tuple(reach['cell'])} still reaches {reach['over_median']:.1f}x the median "
                         "cell: the frozen decoder still reads it across the picture; this lifts the collapse, not the reach")
        return "\n".join(lines)

    def pictures(self) -> dict:
        return {"verdict_before": self.pictures_before, "verdict_after": self.pictures_after}


def _line(m: dict) -> str:
    reach = m["reach_at_worst_cell"]
    return (f"{m['line']}; deepest log-variance {m['logvar_min']:.2f} (typical {m['typical_logvar']:.2f}), "
            f"{m['floor_hits']} clamp-floor hits" + ("" if reach is None else f", reach at {tuple(reach['cell'])} "
                                                     f"{reach['over_median']:.1f}x the median cell"))


def finetune_vae(model: AutoencoderKL, images: list[torch.Tensor], names: list[str], settings: FinetuneSettings, *,
                 world: World = World(), progress: Optional[ProgressFn] = None,
                 log: Optional[Callable[[str], None]] = None) -> FinetuneResult:
    """Fine-tune a copy of `model`'s encoder on `images` (`[3, H, W]` uint8, as `train_data` reads
    them); `model` is left as it was. On several ranks every rank calls this with the same arguments."""
    s, started, say = settings.check(), time.monotonic(), log or (lambda text: None)
    teacher = model.eval().requires_grad_(False)
    if teacher.config.downscale * 4 > s.crop:
        raise InputError("crop", f"{s.crop} px", f"at least {teacher.config.downscale * 4} px (4 latent cells)")
    evals = [centre_square(img, s.eval_size) for img in images[:s.eval_images]]
    before = measure(teacher, evals, names[:len(evals)])
    floor = s.floor if s.floor is not None else before["typical_logvar"] - s.margin
    student = copy.deepcopy(teacher)
    trained = [*student.encoder.parameters(), *([] if student.quant_conv is None else student.quant_conv.parameters())]
    for p in trained:
        p.requires_grad_(True)
    say(f"fine-tuning the encoder ({sum(p.numel() for p in trained) / 1e6:.2f} M parameters) for {s.steps} steps; "
        f"log-variance floor {floor:.2f}; {world.size} process(es)")
    history = train_loop(trained, lambda x: _loss(teacher, student, x, floor, s.mean_weight, world), images, s,
                         world, progress, say)
    student.eval().requires_grad_(False)
    worst = (before["reach_at_worst_cell"] or {}).get("cell"), before["worst_image"]
    after = measure(student, evals, names[:len(evals)], worst)
    return FinetuneResult(s, floor, before, after, drift(teacher, student, evals), history,
                          before.pop("picture"), after.pop("picture"), student, time.monotonic() - started)


def train_loop(trained: list, loss_of: Callable[[torch.Tensor], dict], images: list[torch.Tensor], s, world: World,
               progress: Optional[ProgressFn], say: Callable[[str], None]) -> list[dict]:
    """AdamW on `trained` for `s.steps` steps of `s.batch` seeded random crops of `s.crop` px from
    `images` (`[3, H, W]` uint8), this rank's share of each; `loss_of(x)` gives the terms to log and
    "backward", the loss to differentiate. The history: the terms every 10 steps and at the end."""
    opt = torch.optim.AdamW(trained, lr=s.lr, weight_decay=0.0)
    gen, history, steps = torch.Generator().manual_seed(s.seed), [], Steps(progress, s.steps)
    device = trained[0].device
    for step in range(1, s.steps + 1):
        x = world.my_slice(random_crops(images, s.batch, s.crop, gen)).to(device)
        terms = loss_of(x)
        opt.zero_grad(set_to_none=True)
        terms.pop("backward").backward()
        world.average_gradients(trained)
        opt.step()
        steps.step()
        if step % 10 == 0 or step == s.steps:
            history.append({"step": step, **{k: float(f"{float(v.detach()):.6g}") for k, v in terms.items()}})
            say(f"step {step}/{s.steps}  " + "  ".join(f"{k} {v:.5g}" for k, v in history[-1].items() if k != "step"))
    return history


def _loss(teacher, student, x: torch.Tensor, floor: float, mean_weight: float, world: World) -> dict:
    """The fine-tuning loss on this rank's crops `x` `[b, 3, S, S]` in -1..1, normalised over the
    whole batch (counts and the means' variance summed over ranks), times the world size: averaged
    over ranks, its gradient is the full batch's."""
    c = teacher.config.latent_channels
    with torch.no_grad():
        m0 = teacher.moments(x).float()
    m = student.moments(x).float()
    mu0, low = m0[:, :c], m0[:, c:] < floor     # collapsed elements: rare, so averaged on their own
    count = torch.tensor(float(mu0.numel()), device=mu0.device)
    n, s1, s2, n_low = world.all_sum(torch.stack([count, mu0.sum(), mu0.pow(2).sum(), low.sum().float()]))
    var = ((s2 - s1 * s1 / n) / (n - 1)).clamp_min(1e-8)
    err = m[:, c:] - m0[:, c:].clamp_min(floor)
    n_keep = n - n_low
    terms = {"mean": (m[:, :c] - mu0).pow(2).sum() / n / var,
             "keep": err[~low].pow(2).sum() / n_keep.clamp_min(1),
             "lift": err[low].pow(2).sum() / n_low.clamp_min(1)}
    loss = mean_weight * terms["mean"] + terms["keep"] + terms["lift"]
    logged = world.all_sum(torch.stack([loss.detach(), *(v.detach() for v in terms.values())]))
    return {"backward": loss * world.size, **dict(zip(("loss", *terms), logged))}


def measure(model: AutoencoderKL, images: list[torch.Tensor], names: list[str], cell=None) -> dict:
    """The Health Check on `images` (`[1, 3, S, S]` 0..1) plus the reach at `cell` ((y, x), image
    index), by default the deepest anomaly's; `picture` is the verdict picture (popped by the caller)."""
    result = inspect_vae(model_codec(model, "vae"), images, names=names, check_reach=False)
    maps = [min_map(p, 0) for p in result.posteriors]
    lowest = [float(m.min()) for m in maps]
    anomalies = [(a, i) for i, rep in enumerate(result.found) for a in rep.anomalies]
    deepest = min(anomalies, key=lambda ai: ai[0].logvar_raw_min, default=None)
    if cell is None or cell[0] is None:
        cell = ((deepest[0].y, deepest[0].x), deepest[1]) if deepest else (None, None)
    (yx, image) = cell
    return {"status": result.verdict.status, "black_hole": result.verdict.black_hole, "line": result.verdict.line(),
            "anomalies": len(anomalies), "deepest_drop": None if deepest is None else deepest[0].drop,
            "logvar_min": min(lowest), "typical_logvar": vae_baseline(maps).median,
            "floor_hits": sum(int((m <= LOGVAR_MIN).sum()) for m in maps), "worst_image": image,
            "reach_at_worst_cell": None if yx is None else _reach_at(model, images[image], yx),
            "picture": result.verdict_picture()}


def _reach_at(model: AutoencoderKL, image01: torch.Tensor, yx) -> dict:
    """The fast reach map's value at cell `yx` over the map's median, on `image01`'s posterior mean."""
    reach = model_reach_map(model, image01)
    return {"cell": list(yx), "over_median": float(reach[yx[0], yx[1]] / reach.median().clamp_min(1e-12)),
            "worst_over_median": float(reach.max() / reach.median().clamp_min(1e-12))}


@torch.no_grad()
def drift(teacher, student, images: list[torch.Tensor]) -> dict:
    """How far the student's means (and the pictures the frozen decoder makes of them) moved."""
    p, c = next(teacher.parameters()), teacher.config.latent_channels
    moved, spread, biggest, scores = [], [], 0.0, []
    for img in images:
        x = img.to(p.device, p.dtype) * 2 - 1
        mu0, mu = teacher.moments(x)[:, :c].float(), student.moments(x)[:, :c].float()
        moved.append((mu - mu0).pow(2).mean())
        spread.append(mu0.var())
        biggest = max(biggest, float((mu - mu0).abs().max()))
        if teacher.decoder is not None:
            a = teacher.decode(mu0.to(p.dtype)).float().clamp(-1, 1).add(1).div(2)
            b = teacher.decode(mu.to(p.dtype)).float().clamp(-1, 1).add(1).div(2)
            scores.append(psnr(a, b))
    return {"mean_rms_over_std": float((torch.stack(moved).mean() / torch.stack(spread).mean()).sqrt()),
            "mean_max_abs": biggest, "decoded_psnr_db": sum(scores) / len(scores) if scores else None}

"""Train a KL autoencoder of the SD family (CompVis layout) on real photographs, resumably.

The SD recipe (LDM's `LPIPSWithDiscriminator` without its perceptual and adversarial terms, which
would need downloaded networks): reconstruction loss per pixel (L1 + L2) plus `kl_weight` times the
KL per image spread over its pixels (LDM sums both per image, so 1e-6 there is 1e-6 here), a sample
`z = mean + exp(logvar / 2) * eps` with the log-variance clamped to [-30, 20] as LDM's
`DiagonalGaussianDistribution` does. The fixes the study compares are switches on the same loop:
a higher KL weight, a log-variance floor penalty, extra latent noise and random latent rolls.

A run lives in one folder: `checkpoint.safetensors` (weights, optimiser moments, the data RNG and
the history: no pickle) is rewritten atomically every `checkpoint_every` steps and on Ctrl-C;
calling `train` again on the folder resumes where it stopped and gives the same weights as a run
that never stopped (seeded; deterministic on CPU at one thread count on one kind of machine: one
and two threads round sums differently, three steps already differ, and the same run on a faster
machine differed by step 400). `vae.safetensors` is the model in CompVis keys.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors.torch import load_file, save_file

from .errors import InputError, check_rules
from .model import DECODER_NORMS, AutoencoderKL, VAEConfig
from .progress import ProgressFn, Steps
from .result import Result, write_file_atomically
from .train_data import ImageSet, load_images, random_crops
from .train_eval import evaluate

CHECKPOINT = "checkpoint.safetensors"
META_KEY = "vae_fix.train"
SCHEDULE = ("steps", "eval_every", "checkpoint_every", "eval_reach_size")  # what a resumed run may change


@dataclass(frozen=True)
class TrainSettings:
    # model: CompVis layout, read back by the loader like any VAE
    base_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 2, 4)
    num_res_blocks: int = 1
    latent_channels: int = 4
    mid_attention: bool = True
    # recipe
    kl_weight: float = 1e-6
    logvar_floor: float = -30.0       # the penalty below pushes the raw log-variance above this
    logvar_penalty: float = 0.0       # weight of mean(relu(floor - logvar)^2); 0 = SD (off)
    latent_noise: float = 0.0         # std of extra Gaussian noise on z before decoding
    latent_roll: bool = False         # roll z and the target image by the same random whole cells
    decoder_norm: str = "group"       # "pixel": the decoder's last level normalises each pixel alone
    latent_bound: float = 0.0         # > 0: tanh-bounded latent means, bound * tanh(mean / bound)
    # optimisation
    steps: int = 3000
    batch: int = 8
    crop: int = 128
    lr: float = 5e-4
    warmup: int = 100
    min_lr_ratio: float = 0.1         # cosine decay to lr * this at the last step
    seed: int = 0
    eval_every: int = 500
    checkpoint_every: int = 100
    eval_reach_size: int = 256        # held-out photo size of the reach map (9 decoder backward passes)

    def model_config(self) -> VAEConfig:
        return VAEConfig(base_channels=self.base_channels, channel_mult=tuple(self.channel_mult),
                         num_res_blocks=self.num_res_blocks, z_channels=self.latent_channels,
                         latent_channels=self.latent_channels, mid_attention=self.mid_attention,
                         decoder_norm=self.decoder_norm, latent_bound=self.latent_bound)

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        t = (step - self.warmup) / max(self.steps - self.warmup, 1)
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainSettings":
        known = {f.name for f in fields(cls)}
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in known}
        return cls(**kw)

    def check(self) -> "TrainSettings":
        ds = 2 ** (len(self.channel_mult) - 1)
        rules = [("steps", self.steps >= 1, "at least 1"), ("batch", 1 <= self.batch <= 256, "1 to 256"),
                 ("crop", self.crop % ds == 0 and 32 <= self.crop <= 1024, f"a multiple of {ds} from 32 to 1024"),
                 ("lr", 0 < self.lr < 1, "between 0 and 1"), ("kl_weight", self.kl_weight >= 0, "0 or more"),
                 ("base_channels", self.base_channels % 32 == 0 and self.base_channels > 0,
                  "a positive multiple of 32 (GroupNorm(32))"),
                 ("latent_noise", self.latent_noise >= 0, "0 or more"),
                 ("latent_bound", self.latent_bound == 0 or 0.1 <= self.latent_bound <= 100, "0 (off) or 0.1 to 100"),
                 ("decoder_norm", self.decoder_norm in DECODER_NORMS, f"one of {DECODER_NORMS}"),
                 ("eval_reach_size", self.eval_reach_size % (ds * 4) == 0 and 0 < self.eval_reach_size <= 1024,
                  f"a multiple of {ds * 4} up to 1024 (the reach map needs 4 latent cells a side or more)"),
                 ("logvar_penalty", self.logvar_penalty >= 0, "0 or more")]
        check_rules(self, rules)
        return self


@dataclass
class TrainResult(Result):
    json_name = "train"
    settings: TrainSettings
    step: int
    history: list            # {"step", "loss", "l1", "kl", "lr", "seconds"} per logged step
    evals: list              # {"step", ...evaluate()} at each evaluation point
    data: dict
    folder: str
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {"settings": self.settings.to_dict(), "step": self.step, "folder": self.folder,
                "data": self.data, "history": self.history, "evals": self.evals, "seconds": self.seconds,
                "vae": str(Path(self.folder) / "vae.safetensors")}

    def summary(self) -> str:
        lines = [f"trained to step {self.step}/{self.settings.steps} in {self.folder} "
                 f"({self.seconds / 60:.1f} min this call)"]
        for e in self.evals[-3:]:
            lines.append(eval_line(e))
        return "\n".join(lines)


def eval_line(e: dict) -> str:
    p = e["psnr"]
    v = e.get("verdict") or {}
    reach = (e.get("reach") or {}).get("worst_over_median")
    return (f"step {e['step']}: held-out PSNR {p['128']['mean']:.2f} dB @128, {p['256']['mean']:.2f} dB @256; "
            f"log-variance median {e['logvar_median']:.2f}, min {e['logvar_min']:.2f}, floor hits {e['clamp_floor_hits']}; "
            f"KL {e['kl_per_element']:.3g}/element; scale factor {e['implied_scale_factor']:.3f}; "
            f"worst reach {reach if reach is None else round(reach, 1)}x median; verdict: {v.get('line')}")


def loss_terms(model: AutoencoderKL, x: torch.Tensor, s: TrainSettings, gen: torch.Generator) -> dict:
    """The recipe's loss on a batch `[B, 3, S, S]` in -1..1; random draws from `gen` only (on CPU)."""
    c = s.latent_channels
    m = model.moments(x)
    mean, logvar_raw = m[:, :c], m[:, c:]
    logvar = logvar_raw.clamp(-30.0, 20.0)
    z = mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=gen).to(x.device)
    target = x
    if s.latent_noise:
        z = z + s.latent_noise * torch.randn(z.shape, generator=gen).to(x.device)
    if s.latent_roll:
        dy, dx = (int(v) for v in torch.randint(0, z.shape[-1], (2,), generator=gen))
        ds = x.shape[-1] // z.shape[-1]
        z, target = z.roll((dy, dx), (-2, -1)), x.roll((dy * ds, dx * ds), (-2, -1))
    rec = model.decode(z)
    l1 = (rec - target).abs().mean()
    l2 = (rec - target).pow(2).mean()
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).flatten(1).sum(1).mean()  # per image, as LDM
    loss = l1 + l2 + s.kl_weight * kl / x[0].numel()
    if s.logvar_penalty:
        loss = loss + s.logvar_penalty * torch.relu(s.logvar_floor - logvar_raw).pow(2).mean()
    return {"loss": loss, "l1": l1, "l2": l2, "kl": kl}


@dataclass
class _Run:
    settings: TrainSettings
    model: AutoencoderKL
    opt: torch.optim.Optimizer
    gen: torch.Generator
    step: int = 0
    history: list = field(default_factory=list)
    evals: list = field(default_factory=list)


def _new_run(s: TrainSettings, device) -> _Run:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s.seed)
        model = AutoencoderKL(s.model_config()).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=0.0)
    return _Run(s, model, opt, torch.Generator().manual_seed(s.seed + 1))


def save_checkpoint(run: _Run, folder: Path) -> Path:
    """Weights, AdamW moments, the data RNG and the history in one safetensors file, atomically."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in run.model.state_dict().items()}
    state = run.opt.state_dict()
    steps = {}
    for i, st in state["state"].items():
        tensors[f"opt.{i}.exp_avg"] = st["exp_avg"].cpu().contiguous()
        tensors[f"opt.{i}.exp_avg_sq"] = st["exp_avg_sq"].cpu().contiguous()
        steps[str(i)] = float(st["step"])
    tensors["rng.data"] = run.gen.get_state()
    meta = {"settings": run.settings.to_dict(), "step": run.step, "history": run.history, "evals": run.evals,
            "opt_steps": steps, "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in state["param_groups"]]}
    return write_file_atomically(folder / CHECKPOINT, lambda p: save_file(tensors, str(p), {META_KEY: json.dumps(meta)}))


def read_meta(path: Path) -> Optional[dict]:
    """A checkpoint's settings, step, history and evaluations (no tensors read), or None."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        text = (f.metadata() or {}).get(META_KEY)
    try:
        meta = json.loads(text) if text else None
    except ValueError:
        meta = None
    return meta if isinstance(meta, dict) and isinstance(meta.get("settings"), dict) else None


def load_checkpoint(path: Path, device, settings: Optional[TrainSettings] = None) -> _Run:
    """The run saved at `path` (`settings`, when given, replace the saved ones: e.g. more steps)."""
    meta = read_meta(path)
    if meta is None:
        raise InputError("checkpoint", f"'{path}' has no training metadata", "a checkpoint written by vae_fix train")
    saved = TrainSettings.from_dict(meta["settings"])
    s = settings or saved
    changed = [f.name for f in fields(TrainSettings)
               if f.name not in SCHEDULE and getattr(s, f.name) != getattr(saved, f.name)]
    if changed:
        name = changed[0]
        raise InputError(name, f"{getattr(s, name)!r} differs from the run being resumed ({getattr(saved, name)!r} "
                         f"in {path})", f"the run's own value, or a new folder (a resumed run may only change "
                         f"{', '.join(SCHEDULE)})")
    tensors = load_file(str(path))
    run = _new_run(s, device)
    run.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    n = len(list(run.model.parameters()))
    state = {i: {"step": torch.tensor(meta["opt_steps"][str(i)]), "exp_avg": tensors[f"opt.{i}.exp_avg"].to(device),
                 "exp_avg_sq": tensors[f"opt.{i}.exp_avg_sq"].to(device)} for i in range(n) if str(i) in meta["opt_steps"]}
    groups = [{**g, "params": list(range(n))} for g in meta["param_groups"]]
    run.opt.load_state_dict({"state": state, "param_groups": groups})
    run.gen.set_state(tensors["rng.data"])
    run.step, run.history, run.evals = int(meta["step"]), list(meta["history"]), list(meta["evals"])
    return run


def export_vae(model: AutoencoderKL, path: Path, dtype=torch.float16, metadata: Optional[dict] = None) -> Path:
    """The model as a CompVis-keyed safetensors file (fp16 by default: half the size, loads anywhere)."""
    from .loader import save_vae

    copy = AutoencoderKL(model.config)
    copy.load_state_dict({k: v.detach().cpu() for k, v in model.state_dict().items()})
    return write_file_atomically(path, lambda p: save_vae(copy.to(dtype), p, metadata=metadata))


def settings_for(folder, **given) -> TrainSettings:
    """The settings of a run: the checkpoint's in `folder` (when there is one) with `given` on top,
    else the defaults with `given` on top. `None` values are not given."""
    given = {k: v for k, v in given.items() if v is not None}
    ckpt = Path(folder) / CHECKPOINT
    meta = read_meta(ckpt) if ckpt.exists() else None
    if meta is not None:
        return TrainSettings.from_dict({**meta["settings"], **given}).check()
    return TrainSettings.from_dict({**TrainSettings().to_dict(), **given}).check()


def train(folder, settings: Optional[TrainSettings] = None, *, images: Optional[ImageSet] = None, device="cpu",
          progress: Optional[ProgressFn] = None, log: Optional[Callable[[str], None]] = None,
          max_seconds: Optional[float] = None) -> TrainResult:
    """Train into `folder`, resuming its checkpoint when there is one (then `settings` may only
    change the schedule, e.g. more steps). Stops at `settings.steps`, after `max_seconds` (a
    checkpoint is written), or on KeyboardInterrupt from `progress` or Ctrl-C (likewise)."""
    folder = Path(folder)
    started = time.monotonic()
    ckpt = folder / CHECKPOINT
    if ckpt.exists():
        run = load_checkpoint(ckpt, device, settings.check() if settings else None)
    else:
        run = _new_run((settings or TrainSettings()).check(), device)
    s = run.settings
    data = images or load_images()
    folder.mkdir(parents=True, exist_ok=True)
    steps = Steps(progress, s.steps - run.step)
    say = log or (lambda text: None)
    say(f"training {sum(p.numel() for p in run.model.parameters()) / 1e6:.2f} M parameters from step {run.step} to {s.steps}; "
        f"{len(data.train)} training images, held out: {', '.join(data.held_names) or 'none'}")
    tick = time.monotonic()
    try:
        while run.step < s.steps:
            _one_step(run, data, device)
            steps.step()
            if run.step % 10 == 0 or run.step == s.steps:
                run.history[-1]["seconds"] = round((time.monotonic() - tick) / 10, 4)
                tick = time.monotonic()
                say(_step_line(run, started, steps))
            if run.step % s.eval_every == 0 or run.step == s.steps:
                run.evals.append({"step": run.step, **evaluate(run.model, data.held, data.held_names, s.eval_reach_size)})
                say(eval_line(run.evals[-1]))
            if run.step % s.checkpoint_every == 0 or run.step == s.steps:
                save_checkpoint(run, folder)
            if max_seconds is not None and time.monotonic() - started > max_seconds:
                say(f"stopping after {max_seconds:.0f} s at step {run.step}: run again to resume")
                break
    except KeyboardInterrupt:
        save_checkpoint(run, folder)
        say(f"interrupted at step {run.step}: checkpoint written, run again to resume")
        raise
    save_checkpoint(run, folder)
    export_vae(run.model, folder / "vae.safetensors", metadata={"vae_fix.train_step": str(run.step),
                                                                  "vae_fix.train_settings": json.dumps(s.to_dict())})
    return TrainResult(s, run.step, run.history, run.evals, data.to_json(), str(folder), time.monotonic() - started)


def _one_step(run: _Run, data: ImageSet, device) -> None:
    s = run.settings
    for group in run.opt.param_groups:
        group["lr"] = s.lr_at(run.step)
    x = random_crops(data.train, s.batch, s.crop, run.gen).to(device)
    terms = loss_terms(run.model, x, s, run.gen)
    run.opt.zero_grad(set_to_none=True)
    terms["loss"].backward()
    run.opt.step()
    run.step += 1
    if run.step % 10 == 0 or run.step == s.steps:
        run.history.append({"step": run.step, "lr": s.lr_at(run.step - 1),
                            **{k: round(float(v.detach()), 6) for k, v in terms.items()}})


def _step_line(run: _Run, started: float, steps: Steps) -> str:
    h = run.history[-1]
    per_step = (time.monotonic() - started) / max(steps.done, 1)
    eta = per_step * (steps.total - steps.done)
    return (f"step {run.step}/{run.settings.steps}  loss {h['loss']:.4f}  L1 {h['l1']:.4f}  KL {h['kl']:.1f}  "
            f"lr {h['lr']:.2e}  {per_step:.2f} s/step  ETA {eta / 60:.1f} min")

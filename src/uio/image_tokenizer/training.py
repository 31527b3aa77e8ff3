"""Training a VQ-GAN from scratch (a Lightning recipe) and measuring it.

Losses (Esser et al. 2021, §3; van den Oord et al. 2017): reconstruction (L1 + L2, no perceptual
term, since no LPIPS weights can be downloaded here), codebook ``|sg(z) - e|^2`` and commitment
``beta * |z - sg(e)|^2`` with straight-through gradients, and an optional PatchGAN discriminator
(hinge loss, taming's adaptive weight) switched on after ``disc_start`` steps.

Codebook health: codes used per epoch are logged as ``train/codebook_usage``; codes unused for
``restart_every`` steps are restarted from recent encoder outputs (a ring buffer), which also
initialises the codebook from data after the first window. Distances and losses are fp32, so
``bf16-mixed`` is safe.

Entry points: ``run(cfg)`` (``uio-train +experiment=vqgan_toyworld`` dispatches ``job: vqgan`` here)
and ``python -m uio.image_tokenizer.training --evaluate DIR`` (reconstruction PSNR and codebook
usage on held-out toy images).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from uio.image_tokenizer.vqgan import VQGAN, get_config

# ================================================================================================
# Recipe configuration
# ================================================================================================


@dataclass
class VQGANTrainConfig:
    """The ``vqgan:`` node of ``conf/experiment/vqgan_toyworld.yaml``."""

    config: str | dict = "vqgan_toy"  # a named VQ-GAN config or a dict of its fields
    image_size: list[int] | None = None  # (H, W); default (resolution, resolution)
    data: str = "toyworld"  # "toyworld" | "shapes" (procedural shapes; no toy world needed)
    num_train_images: int = 6000
    num_val_images: int = 256
    seed: int = 0
    steps: int = 4000
    batch_size: int = 8
    lr: float = 6e-4
    min_lr_ratio: float = 0.05  # cosine decay to lr * min_lr_ratio
    warmup_steps: int = 100
    betas: tuple[float, float] = (0.5, 0.9)  # taming's Adam betas
    l1_weight: float = 1.0
    l2_weight: float = 1.0
    codebook_weight: float = 1.0
    beta: float = 0.25  # commitment weight
    restart_every: int = 100  # steps per dead-code window (0 = never restart)
    restart_until: float = 0.8  # no restarts in the last 20% of training (by progress, see VQGANLitModule.progress)
    buffer_size: int = 8192  # recent encoder outputs kept for restarts
    disc_start: int | None = None  # step that switches the PatchGAN on (None = no discriminator)
    disc_weight: float = 0.1
    disc_ndf: int = 32
    disc_layers: int = 2
    precision: str = "bf16-mixed"
    accelerator: str = "auto"
    devices: int | str = 1
    max_minutes: float | None = 10.0  # wall-clock budget: training ends at `steps` or here, whichever is first
    log_every: int = 50
    num_workers: int = 0
    threads: int | str | None = None  # torch intra-op threads: an int, "auto" (the idle cores) or None (torch's default)
    output_dir: str = "tokenizers/vqgan_toy"  # relative -> under uio_home()

    def __post_init__(self):
        if self.data not in DATA_SOURCES:
            raise ValueError(f"vqgan.data must be one of {sorted(DATA_SOURCES)}, got {self.data!r}")
        for name in ("num_train_images", "num_val_images", "steps", "batch_size", "buffer_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"vqgan.{name} must be a positive int, got {v!r}")
        if self.lr <= 0:
            raise ValueError(f"vqgan.lr must be > 0, got {self.lr}")
        if self.l1_weight < 0 or self.l2_weight < 0 or self.l1_weight + self.l2_weight == 0:
            raise ValueError(f"vqgan.l1_weight / l2_weight must be >= 0 and not both 0, got "
                             f"{self.l1_weight} / {self.l2_weight}")
        self.betas = tuple(float(b) for b in self.betas)
        if not (self.threads is None or self.threads == "auto" or (isinstance(self.threads, int) and self.threads > 0)):
            raise ValueError(f"vqgan.threads must be a positive int, 'auto' or null, got {self.threads!r}")
        get_config(self.config)  # validates the network config early

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VQGANTrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown vqgan training key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**d)


# ================================================================================================
# Data: what the toy model will be asked to generate
# ================================================================================================
def _palette(n: int, rng: np.random.Generator) -> np.ndarray:
    return rng.integers(30, 256, size=(n, 3)).astype(np.float32)


def shapes_images(n: int, size: tuple[int, int], seed: int) -> tuple[np.ndarray, list[str]]:
    """Procedural images (uint8 (n, H, W, 3)) of the four kinds the toy model generates: RGB scenes
    (gradient background, shaded discs and boxes), grayscale depth-like ramps with occluders,
    normal-like RGB maps, and coloured instance masks on black. Returns (images, kinds)."""
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    out = np.zeros((n, h, w, 3), np.uint8)
    kinds = []
    for i in range(n):
        kind = ("rgb", "depth", "normals", "segmentation")[i % 4]
        base = rng.uniform(0, 255, 3).astype(np.float32)
        grad = rng.uniform(-1.5, 1.5, 3).astype(np.float32)
        if kind == "rgb":
            img = base + grad * (yy[..., None] - h / 2) * 64 / h
        elif kind == "depth":
            img = np.repeat((60 + 150 * yy / h)[..., None], 3, axis=2)
        elif kind == "normals":
            img = np.broadcast_to(np.array([128, 200, 160], np.float32), (h, w, 3)).copy()
        else:
            img = np.zeros((h, w, 3), np.float32)
        for _ in range(rng.integers(1, 5)):
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
            ry, rx = rng.uniform(h / 12, h / 4), rng.uniform(w / 12, w / 4)
            disc = rng.random() < 0.5
            m = (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1) if disc else \
                ((np.abs(yy - cy) <= ry) & (np.abs(xx - cx) <= rx))
            if kind == "rgb":
                shade = 1.0 - 0.4 * np.clip((xx - cx) / rx, -1, 1)[..., None]
                val = _palette(1, rng)[0] * shade
            elif kind == "depth":
                val = np.full((h, w, 3), rng.uniform(20, 240), np.float32)
            elif kind == "normals":
                nx = np.clip((xx - cx) / rx, -1, 1)
                ny = np.clip((cy - yy) / ry, -1, 1)
                nz = np.sqrt(np.clip(1 - nx ** 2 - ny ** 2, 0, 1))
                val = (np.stack([nx, ny, nz], -1) + 1) * 127.5
            else:
                val = np.broadcast_to(_palette(1, rng)[0], (h, w, 3))
            img = np.where(m[..., None], val, img)
        out[i] = np.clip(img, 0, 255).astype(np.uint8)
        kinds.append(kind)
    return out, kinds


def toyworld_images(n: int, size: tuple[int, int], seed: int) -> tuple[np.ndarray, list[str]]:
    """Toy-world renderings (uint8 (n, H, W, 3)): RGB scenes and their dense targets rendered the way
    the tasks render them (grayscale depth, normals as RGB, coloured instances on black)."""
    from uio.data import toyworld  # the embedded default's procedural world (issue "Data")

    return toyworld.tokenizer_images(n, size=size, seed=seed)


DATA_SOURCES = {"toyworld": toyworld_images, "shapes": shapes_images}


def load_images(source: str, n: int, size: tuple[int, int], seed: int) -> tuple[np.ndarray, list[str]]:
    if source not in DATA_SOURCES:
        raise ValueError(f"unknown image source {source!r}; expected one of {sorted(DATA_SOURCES)}")
    images, kinds = DATA_SOURCES[source](n, size, seed)
    images = np.asarray(images)
    if images.shape != (n, size[0], size[1], 3) or images.dtype != np.uint8:
        raise ValueError(f"image source {source!r} returned {images.dtype} {images.shape}, expected uint8 "
                         f"{(n, size[0], size[1], 3)}")
    return images, list(kinds)


class ImageArrayDataset(Dataset):
    """uint8 (N, H, W, 3) -> float (3, H, W) in [-1, 1]; random horizontal flips when training."""

    def __init__(self, images: np.ndarray, flip: bool = False, seed: int = 0):
        self.images = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)  # (N, 3, H, W) uint8
        self.flip = flip
        self.gen = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        x = self.images[i].float() / 127.5 - 1.0
        if self.flip and torch.rand((), generator=self.gen) < 0.5:
            x = x.flip(-1)
        return x


# ================================================================================================
# Discriminator (PatchGAN, Isola et al. 2017) — only used when disc_start is set
# ================================================================================================
class PatchDiscriminator(nn.Module):
    """Conv4x4/2 + LeakyReLU, then ``n_layers`` conv-norm-LeakyReLU blocks, then a 1-channel map of
    per-patch real/fake logits."""

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2)]
        ch = ndf
        for i in range(1, n_layers + 1):
            out = ndf * min(2 ** i, 8)
            stride = 2 if i < n_layers else 1
            layers += [nn.Conv2d(ch, out, 4, stride, 1, bias=False), nn.GroupNorm(min(32, out // 4), out),
                       nn.LeakyReLU(0.2)]
            ch = out
        layers.append(nn.Conv2d(ch, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)  # (B, 1, h', w')


def hinge_d_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())


# ================================================================================================
# The LightningModule
# ================================================================================================
def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [-1, 1] (data range 1 after mapping to [0, 1])."""
    x01 = (x.float().clamp(-1, 1) + 1) / 2
    y01 = (y.float().clamp(-1, 1) + 1) / 2
    mse = ((x01 - y01) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    return -10.0 * torch.log10(mse)


class VQGANLitModule(L.LightningModule):
    """Trains a :class:`VQGAN` (manual optimisation: autoencoder step, then discriminator step)."""

    def __init__(self, cfg: VQGANTrainConfig):
        super().__init__()
        self.cfg = cfg
        self.automatic_optimization = False
        self.vqgan = VQGAN(cfg.config, image_size=cfg.image_size)
        n, d = self.vqgan.num_codes, self.vqgan.config.embed_dim
        self.discriminator = PatchDiscriminator(3, cfg.disc_ndf, cfg.disc_layers) if cfg.disc_start is not None else None
        self.register_buffer("window_counts", torch.zeros(n), persistent=False)  # uses since last restart check
        self.register_buffer("epoch_counts", torch.zeros(n), persistent=False)  # uses this epoch
        self.register_buffer("z_buffer", torch.zeros(cfg.buffer_size, d), persistent=False)  # recent encoder outputs
        self.z_filled = 0
        self.z_pos = 0
        self.restarted_total = 0
        self.steps_done = 0  # batches trained (global_step counts both optimisers' steps)
        self.t_start: float | None = None
        self.elapsed = 0.0  # seconds since training started (rank 0's clock)

    # ---- optimisation -------------------------------------------------------------------------
    def configure_optimizers(self):
        cfg = self.cfg
        opt_ae = torch.optim.Adam(self.vqgan.parameters(), lr=cfg.lr, betas=cfg.betas)
        if self.discriminator is None:
            return opt_ae
        opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=cfg.lr, betas=cfg.betas)
        return [opt_ae, opt_d]

    def progress(self) -> float:
        """Fraction of training done: steps, or the wall-clock budget when that is further along,
        so that a run on a slow or busy machine still anneals and stops within ``max_minutes``."""
        p = self.steps_done / self.cfg.steps
        if self.cfg.max_minutes and self.t_start is not None:
            p = max(p, self.elapsed / (60.0 * self.cfg.max_minutes))
        return min(1.0, p)

    def _sync_clock(self) -> None:
        """Rank 0's elapsed time, shared so that every rank uses the same lr and stops together."""
        elapsed = time.time() - self.t_start if self.t_start is not None else 0.0
        if self._trainer is not None and self.trainer.world_size > 1:
            elapsed = float(self.trainer.strategy.broadcast(elapsed, src=0))
        self.elapsed = elapsed

    def lr_factor(self) -> float:
        """Linear warm-up over ``warmup_steps``, then cosine decay to ``min_lr_ratio`` by progress 1."""
        cfg = self.cfg
        if self.steps_done < cfg.warmup_steps:
            return (self.steps_done + 1) / cfg.warmup_steps
        p0 = cfg.warmup_steps / cfg.steps
        t = min(1.0, max(0.0, (self.progress() - p0) / max(1e-8, 1.0 - p0)))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    def on_train_start(self) -> None:
        self.t_start = time.time()

    def _rec_loss(self, x: torch.Tensor, rec: torch.Tensor) -> torch.Tensor:
        rec = rec.float()
        loss = x.new_zeros(())
        if self.cfg.l1_weight:
            loss = loss + self.cfg.l1_weight * (rec - x).abs().mean()
        if self.cfg.l2_weight:
            loss = loss + self.cfg.l2_weight * ((rec - x) ** 2).mean()
        return loss

    def _adaptive_weight(self, rec_loss: torch.Tensor, g_loss: torch.Tensor) -> torch.Tensor:
        """taming's balance: |grad rec| / |grad gan| at the decoder's last layer, times disc_weight."""
        last = self.vqgan.decoder.conv_out.weight
        g_rec = torch.autograd.grad(rec_loss, last, retain_graph=True)[0]
        g_gan = torch.autograd.grad(g_loss, last, retain_graph=True)[0]
        w = (g_rec.float().norm() / (g_gan.float().norm() + 1e-4)).clamp(0.0, 1e4).detach()
        return w * self.cfg.disc_weight

    def training_step(self, batch: torch.Tensor, batch_idx: int):
        cfg = self.cfg
        opts = self.optimizers()
        opt_ae, opt_d = (opts[0], opts[1]) if isinstance(opts, (list, tuple)) else (opts, None)
        x = batch
        self._sync_clock()
        lr = cfg.lr * self.lr_factor()
        for opt in (opt_ae, opt_d):
            for group in (opt.optimizer.param_groups if opt is not None else ()):
                group["lr"] = lr
        out = self.vqgan(x, beta=cfg.beta)
        rec_loss = self._rec_loss(x, out["reconstruction"])
        vq_loss = cfg.codebook_weight * out["codebook_loss"] + out["commitment_loss"]
        loss = rec_loss + vq_loss
        use_disc = self.discriminator is not None and self.steps_done >= cfg.disc_start
        if use_disc:
            g_loss = -self.discriminator(out["reconstruction"]).float().mean()
            d_weight = self._adaptive_weight(rec_loss, g_loss)
            loss = loss + d_weight * g_loss
            self.log("train/g_loss", g_loss.detach())
        opt_ae.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        opt_ae.step()
        if use_disc:
            d_loss = hinge_d_loss(self.discriminator(x).float(),
                                  self.discriminator(out["reconstruction"].detach()).float())
            opt_d.zero_grad(set_to_none=True)
            self.manual_backward(d_loss)
            opt_d.step()
            self.log("train/d_loss", d_loss.detach())

        with torch.no_grad():
            self._track(out["codes"], out["z"])
            step_psnr = psnr(out["reconstruction"], x).mean()
        self.log_dict({"train/loss": loss.detach(), "train/rec_loss": rec_loss.detach(),
                       "train/codebook_loss": out["codebook_loss"].detach(), "train/psnr": step_psnr,
                       "train/lr": lr},
                      prog_bar=True)
        self.steps_done += 1
        step = self.steps_done
        progress = self.progress()
        if step >= cfg.steps or progress >= 1.0:
            self.trainer.should_stop = True
        if cfg.log_every and step % cfg.log_every == 0 and self.trainer.is_global_zero:
            used = int((self.window_counts > 0).sum())
            print(f"step {step}/{cfg.steps} loss {loss.item():.4f} rec {rec_loss.item():.4f} "
                  f"psnr {step_psnr.item():.2f} dB lr {lr:.2e} window-usage {used}/"
                  f"{self.vqgan.num_codes} restarted {self.restarted_total}", flush=True)
        # the first check (after one batch) initialises the codebook from encoder outputs
        if cfg.restart_every and (step == 1 or step % cfg.restart_every == 0) and progress <= cfg.restart_until:
            self.restart_dead_codes()
        return loss.detach()

    # ---- codebook health ----------------------------------------------------------------------
    def _track(self, codes: torch.Tensor, z: torch.Tensor) -> None:
        counts = torch.bincount(codes.flatten(), minlength=self.vqgan.num_codes).to(self.window_counts.dtype)
        self.window_counts += counts
        self.epoch_counts += counts
        flat = z.detach().float().permute(0, 2, 3, 1).reshape(-1, z.shape[1])  # (B*h*w, D)
        if flat.shape[0] > self.z_buffer.shape[0]:
            flat = flat[torch.randperm(flat.shape[0], device=flat.device)[: self.z_buffer.shape[0]]]
        idx = (self.z_pos + torch.arange(flat.shape[0], device=flat.device)) % self.z_buffer.shape[0]
        self.z_buffer[idx] = flat
        self.z_pos = int((self.z_pos + flat.shape[0]) % self.z_buffer.shape[0])
        self.z_filled = min(self.z_buffer.shape[0], self.z_filled + flat.shape[0])

    @torch.no_grad()
    def restart_dead_codes(self) -> int:
        """Re-initialise codes unused since the last check from random recent encoder outputs."""
        counts = self.window_counts
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts)
        dead = (counts == 0).nonzero().flatten()
        n_dead = int(dead.numel())
        emb = self.vqgan.quantize.embedding.weight
        if n_dead and self.z_filled:
            pool = self.z_buffer[: self.z_filled]
            pick = torch.randint(0, pool.shape[0], (n_dead,), device=pool.device)
            noise = 0.01 * pool.std(dim=0, keepdim=True) * torch.randn(n_dead, pool.shape[1], device=pool.device)
            emb[dead] = (pool[pick] + noise).to(emb.dtype)
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.broadcast(emb.data, src=0)  # every rank keeps the same codebook
            self.restarted_total += n_dead
        if self._trainer is not None:
            self.log("train/dead_codes", float(n_dead))
        counts.zero_()
        return n_dead

    def on_train_epoch_end(self) -> None:
        counts = self.epoch_counts
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts)
        self.log("train/codebook_usage", float((counts > 0).float().mean()))
        counts.zero_()

    # ---- validation ---------------------------------------------------------------------------
    def validation_step(self, batch: torch.Tensor, batch_idx: int):
        codes = self.vqgan.encode(batch)
        rec = self.vqgan.decode(codes)
        self.log("val/psnr", psnr(rec, batch).mean(), prog_bar=True, sync_dist=True)


# ================================================================================================
# Entry points
# ================================================================================================
def _output_dir(path: str | Path) -> Path:
    from uio.paths import uio_home

    p = Path(path).expanduser()
    return p if p.is_absolute() else uio_home() / p


def train_vqgan(cfg: VQGANTrainConfig) -> dict[str, Any]:
    """Train, save to ``cfg.output_dir`` (save_pretrained + train_metrics.json) and return the metrics."""
    threads = torch.get_num_threads()
    if cfg.threads:
        n = auto_threads() if cfg.threads == "auto" else int(cfg.threads)
        print(f"intra-op threads: {n}" + (f" (auto: load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)"
                                         if cfg.threads == "auto" else ""), flush=True)
        torch.set_num_threads(n)
    try:
        return _train(cfg)
    finally:
        torch.set_num_threads(threads)


def auto_threads() -> int:
    """The cores other processes leave idle (1-minute load average), at least 1. On a busy machine
    one thread avoids OpenMP threads waiting on each other (measured here: 2 threads ~5x slower per
    step than 1 under a load of 6 on 2 cores, but 2x faster when the machine is idle)."""
    cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:  # pragma: no cover - not on every platform
        return torch.get_num_threads()
    return max(1, min(cores, cores - int(round(load))))


def _train(cfg: VQGANTrainConfig) -> dict[str, Any]:
    L.seed_everything(cfg.seed, workers=True)
    torch.set_float32_matmul_precision("high")
    module = VQGANLitModule(cfg)
    size = module.vqgan.image_size
    t0 = time.time()
    train_images, _ = load_images(cfg.data, cfg.num_train_images, size, seed=cfg.seed)
    val_images, _ = load_images(cfg.data, cfg.num_val_images, size, seed=cfg.seed + VAL_SEED_OFFSET)
    print(f"data: {cfg.num_train_images} train + {cfg.num_val_images} val {cfg.data} images "
          f"{size[0]}x{size[1]} in {time.time() - t0:.1f}s", flush=True)
    train_dl = DataLoader(ImageArrayDataset(train_images, flip=True, seed=cfg.seed), batch_size=cfg.batch_size,
                          shuffle=True, drop_last=True, num_workers=cfg.num_workers)
    val_dl = DataLoader(ImageArrayDataset(val_images), batch_size=64, num_workers=0)
    out_dir = _output_dir(cfg.output_dir)
    trainer = L.Trainer(
        accelerator=cfg.accelerator, devices=cfg.devices, precision=cfg.precision, max_epochs=-1,
        logger=L.pytorch.loggers.CSVLogger(
            str(out_dir), name="logs"), enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, check_val_every_n_epoch=None,
        val_check_interval=max(1, cfg.steps // 4), log_every_n_steps=max(1, cfg.log_every))
    t_train = time.time()
    trainer.fit(module, train_dl, val_dl)
    train_seconds = time.time() - t_train
    tok = module.vqgan.cpu().float().eval()
    metrics = evaluate_tokenizer(tok, val_images)
    metrics.update(steps=module.steps_done, train_seconds=round(train_seconds, 1),
                   restarted_codes=module.restarted_total, data=cfg.data, config=tok.config.to_dict(),
                   threads=torch.get_num_threads())
    if trainer.is_global_zero:
        tok.save_pretrained(out_dir)
        (out_dir / "train_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        print(f"saved {out_dir}: {json.dumps({k: metrics[k] for k in ('psnr', 'codebook_usage', 'steps', 'train_seconds')})}",
              flush=True)
    return metrics


VAL_SEED_OFFSET = 1_000_003  # held-out images come from a disjoint seed


@torch.no_grad()
def evaluate_tokenizer(tok: VQGAN, images: np.ndarray, kinds: list[str] | None = None,
                       batch_size: int = 64) -> dict[str, Any]:
    """Mean per-image PSNR (dB) of encode -> decode, codebook usage (fraction of codes used on these
    images) and code perplexity; per-kind PSNR when ``kinds`` is given."""
    ds = ImageArrayDataset(images)
    scores, counts = [], torch.zeros(tok.num_codes)
    for start in range(0, len(ds), batch_size):
        x = torch.stack([ds[i] for i in range(start, min(len(ds), start + batch_size))])
        codes = tok.encode(x)
        scores.append(psnr(tok.decode(codes), x))
        counts += torch.bincount(codes.flatten(), minlength=tok.num_codes).float()
    scores_t = torch.cat(scores)
    p = counts / counts.sum()
    result: dict[str, Any] = {
        "psnr": round(float(scores_t.mean()), 2),
        "codebook_usage": round(float((counts > 0).float().mean()), 4),
        "codes_used": int((counts > 0).sum()),
        "num_codes": tok.num_codes,
        "perplexity": round(float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum())), 1),
        "num_images": len(ds),
    }
    if kinds is not None:
        result["psnr_by_kind"] = {k: round(float(scores_t[[i for i, kk in enumerate(kinds) if kk == k]].mean()), 2)
                                  for k in sorted(set(kinds))}
    return result


def run(cfg) -> dict[str, Any]:
    """``uio-train`` entry for ``job: vqgan``: trains from the composed config's ``vqgan`` node, then
    checks that the config's ``tokenizer`` spec (if any) finds and accepts what was saved."""
    from omegaconf import DictConfig, OmegaConf

    node = cfg.get("vqgan") if isinstance(cfg, (DictConfig, dict)) else None
    if node is None:
        raise ValueError("job=vqgan needs a 'vqgan' config node (see conf/experiment/vqgan_toyworld.yaml)")
    d = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    if d.get("output_dir") is None:
        raise ValueError("vqgan.output_dir is null: the selected tokenizer has no 'weights' path to train into; "
                         "pick tokenizer=vqgan_toy or set vqgan.output_dir=<dir>")
    metrics = train_vqgan(VQGANTrainConfig.from_dict(d))
    spec = cfg.get("tokenizer")
    if spec is not None and (spec.get("weights") is not None):
        from uio.image_tokenizer.base import build_image_tokenizer

        tok = build_image_tokenizer(spec)  # loads from the weights path and checks num_codes / grid
        print(f"tokenizer spec {spec.get('config')!r} loads the trained weights from {tok.weights_source}", flush=True)
    return metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Evaluate a trained VQ-GAN on held-out toy images.")
    parser.add_argument("--evaluate", required=True, metavar="DIR",
                        help="a VQGAN.save_pretrained directory (relative paths are under uio_home())")
    parser.add_argument("--data", default="toyworld", choices=sorted(DATA_SOURCES))
    parser.add_argument("--num-images", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0, help="the training seed; held-out images use seed + offset")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    tok = VQGAN.from_pretrained(_output_dir(args.evaluate))
    images, kinds = load_images(args.data, args.num_images, tok.image_size, seed=args.seed + VAL_SEED_OFFSET + 1)
    t0 = time.time()
    metrics = evaluate_tokenizer(tok, images, kinds)
    metrics["eval_seconds"] = round(time.time() - t0, 1)
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()

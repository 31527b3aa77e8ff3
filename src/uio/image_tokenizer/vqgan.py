"""A VQ-GAN image tokenizer whose parameter names and numerics follow taming-transformers.

Reference: Esser et al., "Taming Transformers for High-Resolution Image Synthesis" (CVPR 2021),
``taming/modules/diffusionmodules/model.py`` (Encoder/Decoder), ``taming/modules/vqvae/quantize.py``
(VectorQuantizer2) and ``taming/models/vqgan.py`` (VQModel). The released Unified-IO uses the
``vqgan_imagenet_f16_16384`` model (UIO §3.1): 256x256 images -> 16x16 codes out of 16384.

Numerics that a taming checkpoint depends on, all reproduced here:
- GroupNorm(32 groups, eps 1e-6, affine), swish ``x * sigmoid(x)``;
- downsampling: zero pad right and bottom by 1, then a 3x3 stride-2 convolution (no padding);
- upsampling: nearest x2, then a 3x3 convolution;
- single-head spatial self-attention with logits scaled by C^-0.5, placed at the levels whose
  nominal resolution (the config's ``resolution`` halved per level) is in ``attn_resolutions``;
- the decoder builds ``up`` from the lowest resolution but stores it so that ``up.0`` is the
  highest resolution, which runs last;
- the quantizer takes the code minimising |z|^2 + |e|^2 - 2 z.e (ties to the lowest index).

The state-dict names are taming's: ``encoder.*``, ``decoder.*``, ``quantize.embedding.weight``,
``quant_conv.*``, ``post_quant_conv.*``. Everything is fully convolutional, so non-square images
work (256x128 -> a 16x8 grid); attention placement still follows the nominal ``resolution``.
"""
from __future__ import annotations

import dataclasses
import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from uio.image_tokenizer.base import ImageTokenizer, register_image_tokenizer

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
TAMING_PREFIXES = ("encoder.", "decoder.", "quantize.", "quant_conv.", "post_quant_conv.")


# ================================================================================================
# Configuration
# ================================================================================================
@dataclass
class VQGANConfig:
    """taming's ``ddconfig`` fields plus ``embed_dim`` and ``n_embed`` (defaults: ImageNet f16-16384)."""

    ch: int = 128
    out_ch: int = 3
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.0
    resamp_with_conv: bool = True
    in_channels: int = 3
    resolution: int = 256
    z_channels: int = 256
    double_z: bool = False
    embed_dim: int = 256
    n_embed: int = 16384

    def __post_init__(self):
        self.ch_mult = tuple(int(m) for m in self.ch_mult)
        self.attn_resolutions = tuple(int(r) for r in self.attn_resolutions)
        for name in ("ch", "out_ch", "num_res_blocks", "in_channels", "resolution", "z_channels",
                     "embed_dim", "n_embed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"VQGANConfig.{name} must be a positive int, got {v!r}")
        if not self.ch_mult or any(m <= 0 for m in self.ch_mult):
            raise ValueError(f"VQGANConfig.ch_mult must be a non-empty tuple of positive ints, got {self.ch_mult}")
        widths = sorted({self.ch * m for m in (1, *self.ch_mult)})
        bad = [w for w in widths if w % 32]
        if bad:
            raise ValueError(f"every channel width must be divisible by 32 (GroupNorm with 32 groups); "
                             f"ch={self.ch} x ch_mult={self.ch_mult} gives {bad}")
        if self.double_z:
            raise ValueError("VQGANConfig.double_z must be False for a VQ-GAN (the quantizer takes z_channels); "
                             "double_z=True is taming's KL autoencoder")
        if self.resolution % self.downsample_factor:
            raise ValueError(f"VQGANConfig.resolution {self.resolution} must be divisible by the downsampling "
                             f"factor {self.downsample_factor} (2 ** (len(ch_mult) - 1))")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"VQGANConfig.dropout must be in [0, 1), got {self.dropout}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VQGANConfig":
        """Accept a flat dict of fields, taming's ``{ddconfig, embed_dim, n_embed}`` (``params``), or a
        whole taming ``model.yaml`` (``{model: {params: ...}}``); loss and training keys are ignored."""
        d = dict(d)
        if "model" in d and isinstance(d["model"], dict):
            d = dict(d["model"])
        if "params" in d and isinstance(d["params"], dict):
            d = dict(d["params"])
        if "ddconfig" in d:
            flat = dict(d["ddconfig"])
            for k in ("embed_dim", "n_embed"):
                if k not in d:
                    raise ValueError(f"a taming model config needs {k!r} next to 'ddconfig'; got keys {sorted(d)}")
                flat[k] = d[k]
            d = flat
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown VQ-GAN config field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["ch_mult"] = list(self.ch_mult)
        d["attn_resolutions"] = list(self.attn_resolutions)
        return d


# Named configs. Each also ships as conf/tokenizer/<name>.yaml.
CONFIGS: dict[str, dict[str, Any]] = {
    # taming-transformers' ImageNet VQ-GAN used by the released Unified-IO (76.07M parameters).
    "vqgan_imagenet_f16_16384": dict(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,),
                                     resolution=256, z_channels=256, embed_dim=256, n_embed=16384),
    # taming's first ImageNet release (configs/imagenet_vqgan.yaml): same network, 1024 codes.
    "vqgan_imagenet_f16_1024": dict(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,),
                                    resolution=256, z_channels=256, embed_dim=256, n_embed=1024),
    # The embedded default's tokenizer, trained here on toy-world images: 64x64 -> 8x8 codes of 512.
    "vqgan_toy": dict(ch=32, ch_mult=(1, 2, 2, 4), num_res_blocks=1, attn_resolutions=(8,),
                      resolution=64, z_channels=64, embed_dim=32, n_embed=512),
    # Tests: tiny and fast. 32x32 -> 8x8 codes of 64.
    "vqgan_test": dict(ch=32, ch_mult=(1, 1, 2), num_res_blocks=1, attn_resolutions=(8,),
                       resolution=32, z_channels=32, embed_dim=16, n_embed=64),
}


def get_config(config: str | dict[str, Any] | VQGANConfig | Path) -> VQGANConfig:
    """A :class:`VQGANConfig` from a name in :data:`CONFIGS`, a dict, or a taming ``model.yaml`` path."""
    if isinstance(config, VQGANConfig):
        return config
    if isinstance(config, Path) or (isinstance(config, str) and config.endswith((".yaml", ".yml", ".json"))):
        path = Path(config).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"VQ-GAN config file not found: {path}")
        if path.suffix == ".json":
            return VQGANConfig.from_dict(json.loads(path.read_text()))
        from omegaconf import OmegaConf

        return VQGANConfig.from_dict(OmegaConf.to_container(OmegaConf.load(path), resolve=True))
    if isinstance(config, str):
        if config not in CONFIGS:
            raise ValueError(f"unknown VQ-GAN config {config!r}; expected one of {sorted(CONFIGS)} "
                             "or a dict / taming model.yaml path")
        return VQGANConfig(**CONFIGS[config])
    if isinstance(config, dict):
        return VQGANConfig.from_dict(config)
    raise TypeError(f"a VQ-GAN config must be a name, dict or path, got {type(config).__name__}")


# ================================================================================================
# Building blocks (taming names: norm1/conv1/norm2/conv2/nin_shortcut, q/k/v/proj_out/norm, conv)
# ================================================================================================
def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


def _swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    """norm -> swish -> conv3x3 -> norm -> swish -> dropout -> conv3x3, plus a 1x1 shortcut when
    the width changes."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = _norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(_swish(self.norm1(x)))
        h = self.conv2(self.dropout(_swish(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions, logits scaled by C^-0.5, residual."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        # (B, C, h, w) -> (B, 1, h*w, C): one head whose width is all C channels
        q, k, v = (t.reshape(b, 1, c, h * w).transpose(2, 3) for t in (self.q(y), self.k(y), self.v(y)))
        out = F.scaled_dot_product_attention(q, k, v, scale=c ** -0.5)  # (B, 1, h*w, C)
        out = out.transpose(2, 3).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Halve the resolution: pad (left 0, right 1, top 0, bottom 1) with zeros, 3x3 stride-2 conv
    (or 2x2 average pooling when ``with_conv`` is False)."""

    def __init__(self, channels: int, with_conv: bool = True):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.with_conv:
            return F.avg_pool2d(x, kernel_size=2, stride=2)
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour x2, then a 3x3 conv (if ``with_conv``)."""

    def __init__(self, channels: int, with_conv: bool = True):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.with_conv else x


class _Level(nn.Module):
    """One resolution level: ``block`` (ResnetBlocks), ``attn`` (AttnBlocks, possibly empty) and an
    optional ``downsample``/``upsample`` (taming builds these as bare nn.Modules)."""

    def __init__(self):
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()

    def run_blocks(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn) > 0:
                h = self.attn[i](h)
        return h


class _Mid(nn.Module):
    def __init__(self, channels: int, dropout: float):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) -> latent (B, z_channels, H/f, W/f), f = 2 ** (levels - 1)."""

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        self.num_resolutions = len(cfg.ch_mult)
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, kernel_size=3, stride=1, padding=1)
        in_mult = (1, *cfg.ch_mult)
        res = cfg.resolution
        self.down = nn.ModuleList()
        block_in = cfg.ch
        for level in range(self.num_resolutions):
            stage = _Level()
            block_in, block_out = cfg.ch * in_mult[level], cfg.ch * cfg.ch_mult[level]
            for _ in range(cfg.num_res_blocks):
                stage.block.append(ResnetBlock(block_in, block_out, cfg.dropout))
                block_in = block_out
                if res in cfg.attn_resolutions:
                    stage.attn.append(AttnBlock(block_in))
            if level != self.num_resolutions - 1:
                stage.downsample = Downsample(block_in, cfg.resamp_with_conv)
                res //= 2
            self.down.append(stage)
        self.mid = _Mid(block_in, cfg.dropout)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.z_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level, stage in enumerate(self.down):
            h = stage.run_blocks(h)
            if level != self.num_resolutions - 1:
                h = stage.downsample(h)
        h = self.mid(h)
        return self.conv_out(_swish(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent (B, z_channels, h, w) -> image (B, out_ch, h*f, w*f). ``up[0]`` is the highest
    resolution and runs last (taming builds from the lowest level and prepends)."""

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        self.num_resolutions = len(cfg.ch_mult)
        block_in = cfg.ch * cfg.ch_mult[-1]
        res = cfg.resolution // cfg.downsample_factor
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = _Mid(block_in, cfg.dropout)
        levels: list[_Level] = []
        for level in reversed(range(self.num_resolutions)):
            stage = _Level()
            block_out = cfg.ch * cfg.ch_mult[level]
            for _ in range(cfg.num_res_blocks + 1):
                stage.block.append(ResnetBlock(block_in, block_out, cfg.dropout))
                block_in = block_out
                if res in cfg.attn_resolutions:
                    stage.attn.append(AttnBlock(block_in))
            if level != 0:
                stage.upsample = Upsample(block_in, cfg.resamp_with_conv)
                res *= 2
            levels.insert(0, stage)
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.out_ch, kernel_size=3, stride=1, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(range(self.num_resolutions)):
            stage = self.up[level]
            h = stage.run_blocks(h)
            if level != 0:
                h = stage.upsample(h)
        return self.conv_out(_swish(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """Nearest-codebook-entry quantizer (taming's VectorQuantizer2 numerics, name ``embedding``).

    Distances are computed in fp32 even under bf16 autocast, so the chosen codes do not depend on
    the training precision.
    """

    def __init__(self, n_embed: int, embed_dim: int, chunk_elems: int = 1 << 24):
        super().__init__()
        self.n_embed, self.embed_dim = n_embed, embed_dim
        self.embedding = nn.Embedding(n_embed, embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / n_embed, 1.0 / n_embed)  # taming's init
        self.chunk_elems = chunk_elems  # bound on the (rows, n_embed) distance block

    def nearest(self, z_flat: torch.Tensor) -> torch.Tensor:
        """(N, D) vectors -> (N,) int64 index of the closest code; argmin keeps the lowest index on ties."""
        with torch.autocast(device_type=z_flat.device.type, enabled=False):
            z = z_flat.float()
            e = self.embedding.weight.float()  # (K, D)
            e_sq = (e * e).sum(dim=1)  # (K,)
            rows = max(1, self.chunk_elems // max(1, self.n_embed))
            out = []
            for start in range(0, z.shape[0], rows):
                zc = z[start:start + rows]  # (n, D)
                d = (zc * zc).sum(dim=1, keepdim=True) + e_sq - 2.0 * (zc @ e.t())  # (n, K)
                out.append(torch.argmin(d, dim=1))
            return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=z.device)

    def codes(self, z: torch.Tensor) -> torch.Tensor:
        """Latent (B, D, h, w) -> codes (B, h, w)."""
        b, d, h, w = z.shape
        z_flat = z.permute(0, 2, 3, 1).reshape(-1, d)  # (B*h*w, D), row-major over (h, w)
        return self.nearest(z_flat).reshape(b, h, w)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, h, w) -> latent (B, D, h, w)."""
        return self.embedding(codes).permute(0, 3, 1, 2).contiguous()

    def forward(self, z: torch.Tensor, beta: float = 0.25):
        """Training path: (z_q with straight-through gradients, codes (B, h, w), codebook loss,
        commitment loss). The codebook term pulls codes to sg(z); beta * commitment pulls z to sg(e)."""
        codes = self.codes(z.detach())
        z_q = self.lookup(codes).to(z.dtype)
        codebook = F.mse_loss(z_q.float(), z.detach().float())
        commitment = F.mse_loss(z.float(), z_q.detach().float())
        z_q = z + (z_q - z).detach()
        return z_q, codes, codebook, beta * commitment


# ================================================================================================
# The tokenizer
# ================================================================================================
class VQGAN(ImageTokenizer):
    """taming-compatible VQ-GAN as an :class:`ImageTokenizer`.

    >>> tok = VQGAN("vqgan_test")                       # random weights
    >>> codes = tok.encode(torch.zeros(2, 3, 32, 32))   # (2, 64) row-major codes
    >>> images = tok.decode(codes)                      # (2, 3, 32, 32)
    """

    def __init__(self, config: str | dict[str, Any] | VQGANConfig = "vqgan_imagenet_f16_16384",
                 image_size: tuple[int, int] | list[int] | int | None = None):
        super().__init__()
        self.config = get_config(config)
        cfg = self.config
        if image_size is None:
            image_size = (cfg.resolution, cfg.resolution)
        elif isinstance(image_size, int):
            image_size = (image_size, image_size)
        image_size = tuple(int(v) for v in image_size)
        f = cfg.downsample_factor
        if len(image_size) != 2 or any(v <= 0 or v % f for v in image_size):
            raise ValueError(f"image_size must be (H, W) with both divisible by the downsampling factor {f}, "
                             f"got {image_size}")
        self.image_size = image_size
        self.grid = (image_size[0] // f, image_size[1] // f)
        self.num_codes = cfg.n_embed
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = VectorQuantizer(cfg.n_embed, cfg.embed_dim)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, kernel_size=1)
        self.weights_source: str | None = None  # where weights were loaded from (provenance only)

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    # ---- continuous paths (training uses these) -----------------------------------------------
    def encode_latent(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) -> pre-quantisation latent (B, embed_dim, gh, gw)."""
        return self.quant_conv(self.encoder(images))

    def decode_latent(self, z_q: torch.Tensor) -> torch.Tensor:
        """Quantised latent (B, embed_dim, gh, gw) -> images (B, 3, H, W)."""
        return self.decoder(self.post_quant_conv(z_q))

    def forward(self, images: torch.Tensor, beta: float = 0.25) -> dict[str, torch.Tensor]:
        """Autoencode (training path, no input checks): reconstruction, codes, latents and VQ losses."""
        z = self.encode_latent(images)  # (B, D, gh, gw)
        z_q, codes, codebook, commitment = self.quantize(z, beta=beta)
        rec = self.decode_latent(z_q)
        return {"reconstruction": rec, "codes": codes, "z": z, "codebook_loss": codebook,
                "commitment_loss": commitment}

    # ---- ImageTokenizer -----------------------------------------------------------------------
    @torch.no_grad()
    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.quantize.codes(self.encode_latent(images)).flatten(1)  # (B, gh*gw) row-major

    @torch.no_grad()
    def _decode(self, codes: torch.Tensor) -> torch.Tensor:
        gh, gw = self.grid
        z_q = self.quantize.lookup(codes.reshape(codes.shape[0], gh, gw))  # (B, D, gh, gw)
        return self.decode_latent(z_q.to(self.post_quant_conv.weight.dtype))

    def spec(self) -> dict[str, Any]:
        return {"name": "vqgan", "config": self.config.to_dict(), "image_size": list(self.image_size)}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> "VQGAN":
        """``{"name": "vqgan", "config": name | dict | yaml path, "weights": None | dir | .safetensors |
        .ckpt, "image_size": [H, W] optional}``. A relative ``weights`` path is taken under
        :func:`uio.paths.uio_home` (so ``tokenizers/vqgan_toy`` finds the locally trained one)."""
        spec = dict(spec)
        spec.pop("name", None)
        allowed = {"config", "weights", "image_size"}
        unknown = sorted(set(spec) - allowed)
        if unknown:
            raise ValueError(f"unknown vqgan spec key(s) {unknown}; expected {sorted(allowed)} (+ name, num_codes, grid)")
        config = spec.get("config", "vqgan_imagenet_f16_16384")
        weights = spec.get("weights")
        image_size = spec.get("image_size")
        if weights is None:
            return cls(config, image_size=image_size)
        path = resolve_weights_path(weights)
        if path.suffix == ".ckpt" or path.suffix == ".pt":
            return cls.from_taming(path, config, image_size=image_size)
        tok = cls.from_pretrained(path, image_size=image_size)
        if "config" in spec and get_config(config) != tok.config:
            raise ValueError(f"the weights in {path} are for VQ-GAN config {tok.config.to_dict()}, but the spec "
                             f"asks for {get_config(config).to_dict()}")
        return tok

    # ---- saving / loading ---------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``model.safetensors`` and ``config.json`` to ``directory``; returns it."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt", "tokenizer": "vqgan"})
        meta = {"name": "vqgan", "config": self.config.to_dict(), "image_size": list(self.image_size)}
        (directory / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
        return directory

    @classmethod
    def from_pretrained(cls, path: str | Path, image_size: tuple[int, int] | None = None) -> "VQGAN":
        """Load a directory written by :meth:`save_pretrained` (or its ``model.safetensors`` file,
        with ``config.json`` beside it)."""
        from safetensors.torch import load_file

        path = Path(path).expanduser()
        directory = path.parent if path.is_file() else path
        weights = path if path.is_file() else directory / WEIGHTS_NAME
        cfg_file = directory / CONFIG_NAME
        for f in (weights, cfg_file):
            if not f.is_file():
                raise FileNotFoundError(f"VQ-GAN file not found: {f} (expected {WEIGHTS_NAME} and {CONFIG_NAME} in "
                                        f"{directory}; train one with `uio-train +experiment=vqgan_toyworld`)")
        meta = json.loads(cfg_file.read_text())
        if meta.get("name", "vqgan") != "vqgan":
            raise ValueError(f"{cfg_file} describes tokenizer {meta.get('name')!r}, not 'vqgan'")
        tok = cls(meta["config"], image_size=image_size if image_size is not None else meta.get("image_size"))
        tok.load_checked_state_dict(load_file(str(weights)), source=str(weights))
        tok.weights_source = str(directory)
        return tok

    @classmethod
    def from_taming(cls, ckpt_path: str | Path, config: str | dict[str, Any] | Path | VQGANConfig,
                    image_size: tuple[int, int] | None = None) -> "VQGAN":
        """Build from a taming-transformers checkpoint (a Lightning ``.ckpt`` whose ``state_dict`` holds
        ``encoder.*``, ``decoder.*``, ``quantize.embedding.weight``, ``quant_conv.*``,
        ``post_quant_conv.*``; ``loss.*`` and other extra keys are ignored) and its model config
        (a name, a dict of ``ddconfig`` fields + ``embed_dim`` + ``n_embed``, or the ``model.yaml`` path).
        Loading is strict and uses ``torch.load(weights_only=True)``."""
        ckpt_path = Path(ckpt_path).expanduser()
        if not ckpt_path.is_file():
            raise FileNotFoundError(f"taming checkpoint not found: {ckpt_path}")
        try:
            ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise ValueError(
                f"{ckpt_path} holds objects other than tensors, which torch.load(weights_only=True) refuses "
                f"({e}). Re-save just the weights once in a trusted environment: "
                "torch.save({'state_dict': torch.load(path, weights_only=False)['state_dict']}, new_path)") from e
        if not isinstance(ckpt, dict):
            raise ValueError(f"{ckpt_path} must hold a dict (a Lightning checkpoint or a state dict), "
                             f"got {type(ckpt).__name__}")
        state = ckpt.get("state_dict", ckpt)
        if not isinstance(state, dict):
            raise ValueError(f"{ckpt_path}: 'state_dict' must be a dict of tensors, got {type(state).__name__}")
        state = {k: v for k, v in state.items() if k.startswith(TAMING_PREFIXES)}
        tok = cls(config, image_size=image_size)
        tok.load_checked_state_dict(state, source=str(ckpt_path))
        tok.weights_source = str(ckpt_path)
        return tok

    def load_checked_state_dict(self, state: dict[str, torch.Tensor], source: str = "state dict") -> None:
        """Strict load; every missing, unexpected or mis-shaped key is listed with its shape(s)."""
        own = self.state_dict()
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        shapes = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
        if missing or unexpected or shapes:
            lines = [f"  mis-shaped key {k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                     for k in shapes]
            lines += [f"  missing key {k}: model expects {tuple(own[k].shape)}, not in checkpoint" for k in missing]
            lines += [f"  unexpected key {k}: checkpoint {tuple(state[k].shape)}, not in model" for k in unexpected]
            shown = lines[:40] + ([f"  ... and {len(lines) - 40} more"] if len(lines) > 40 else [])
            raise ValueError(f"{source} does not match VQ-GAN config {self.config.to_dict()}: "
                             f"{len(shapes)} mis-shaped, {len(missing)} missing, {len(unexpected)} unexpected\n"
                             + "\n".join(shown))
        self.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)


def resolve_weights_path(weights: str | Path) -> Path:
    """``~`` and absolute paths as given; a relative path lives under ``uio_home()``."""
    from uio.paths import uio_home

    path = Path(weights).expanduser()
    if not path.is_absolute():
        path = uio_home() / path
    if not path.exists():
        raise FileNotFoundError(f"VQ-GAN weights not found at {path}; train the toy tokenizer with "
                                "`uio-train +experiment=vqgan_toyworld` or point 'weights' at a directory written by "
                                "VQGAN.save_pretrained / a taming .ckpt")
    return path


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@register_image_tokenizer("vqgan")
def _build_vqgan(spec: dict[str, Any]) -> VQGAN:
    return VQGAN.from_spec(spec)


__all__ = ["VQGAN", "VQGANConfig", "CONFIGS", "get_config", "Encoder", "Decoder", "VectorQuantizer",
           "ResnetBlock", "AttnBlock", "Downsample", "Upsample", "resolve_weights_path", "count_parameters"]

"""VQ-GAN image tokenizer: taming names/shapes/numerics, strict loading, the interface, the registry."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from uio.image_tokenizer import (
    CONFIGS,
    VQGAN,
    ImageTokenizer,
    VQGANConfig,
    available_image_tokenizers,
    build_image_tokenizer,
    register_image_tokenizer,
)
from uio.image_tokenizer.vqgan import VectorQuantizer

REPO = Path(__file__).resolve().parents[1]


# A scaled-down f16 network: same structure as vqgan_imagenet_f16_16384 (5 levels, 2 res blocks,
# attention at the lowest level), narrower and at 64x64 so the reference forward is fast.
SMALL_F16 = dict(ch=32, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(4,), resolution=64,
                 z_channels=32, embed_dim=24, n_embed=128)


# ---- an independent functional reference of taming's forward, driven only by state-dict names ----
def _gn(sd, p, x):
    return F.group_norm(x, 32, sd[p + ".weight"], sd[p + ".bias"], eps=1e-6)


def _conv(sd, p, x, stride=1, padding=None):
    w = sd[p + ".weight"]
    pad = w.shape[-1] // 2 if padding is None else padding
    return F.conv2d(x, w, sd[p + ".bias"], stride=stride, padding=pad)


def _swish(x):
    return x * torch.sigmoid(x)


def _res(sd, p, x):
    h = _conv(sd, p + ".conv1", _swish(_gn(sd, p + ".norm1", x)))
    h = _conv(sd, p + ".conv2", _swish(_gn(sd, p + ".norm2", h)))
    if p + ".nin_shortcut.weight" in sd:
        x = _conv(sd, p + ".nin_shortcut", x)
    return x + h


def _attn(sd, p, x):
    b, c, hh, ww = x.shape
    y = _gn(sd, p + ".norm", x)
    q = _conv(sd, p + ".q", y).reshape(b, c, hh * ww).permute(0, 2, 1)  # b, hw, c
    k = _conv(sd, p + ".k", y).reshape(b, c, hh * ww)  # b, c, hw
    w = torch.softmax(torch.bmm(q, k) * c ** -0.5, dim=2)  # b, hw(q), hw(k)
    v = _conv(sd, p + ".v", y).reshape(b, c, hh * ww)
    out = torch.bmm(v, w.permute(0, 2, 1)).reshape(b, c, hh, ww)
    return x + _conv(sd, p + ".proj_out", out)


def _count(sd, prefix):
    return len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})


def ref_encode(sd, x):
    h = _conv(sd, "encoder.conv_in", x)
    levels = _count(sd, "encoder.down.")
    for i in range(levels):
        for j in range(_count(sd, f"encoder.down.{i}.block.")):
            h = _res(sd, f"encoder.down.{i}.block.{j}", h)
            if f"encoder.down.{i}.attn.{j}.q.weight" in sd:
                h = _attn(sd, f"encoder.down.{i}.attn.{j}", h)
        if f"encoder.down.{i}.downsample.conv.weight" in sd:
            h = _conv(sd, f"encoder.down.{i}.downsample.conv", F.pad(h, (0, 1, 0, 1)), stride=2, padding=0)
    h = _res(sd, "encoder.mid.block_2", _attn(sd, "encoder.mid.attn_1", _res(sd, "encoder.mid.block_1", h)))
    h = _conv(sd, "encoder.conv_out", _swish(_gn(sd, "encoder.norm_out", h)))
    z = _conv(sd, "quant_conv", h)
    e = sd["quantize.embedding.weight"]
    zf = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    d = (zf ** 2).sum(1, keepdim=True) + (e ** 2).sum(1) - 2 * zf @ e.t()
    return d.argmin(1).reshape(z.shape[0], -1)


def ref_decode(sd, codes, gh, gw):
    e = sd["quantize.embedding.weight"]
    z = e[codes].reshape(codes.shape[0], gh, gw, -1).permute(0, 3, 1, 2)
    h = _conv(sd, "decoder.conv_in", _conv(sd, "post_quant_conv", z))
    h = _res(sd, "decoder.mid.block_2", _attn(sd, "decoder.mid.attn_1", _res(sd, "decoder.mid.block_1", h)))
    for i in reversed(range(_count(sd, "decoder.up."))):  # up.0 (highest resolution) runs last
        for j in range(_count(sd, f"decoder.up.{i}.block.")):
            h = _res(sd, f"decoder.up.{i}.block.{j}", h)
            if f"decoder.up.{i}.attn.{j}.q.weight" in sd:
                h = _attn(sd, f"decoder.up.{i}.attn.{j}", h)
        if f"decoder.up.{i}.upsample.conv.weight" in sd:
            h = _conv(sd, f"decoder.up.{i}.upsample.conv", F.interpolate(h, scale_factor=2.0, mode="nearest"))
    return _conv(sd, "decoder.conv_out", _swish(_gn(sd, "decoder.norm_out", h)))


def taming_keys(cfg: dict) -> dict[str, tuple]:
    """taming's state-dict names and shapes for a VQModel config, enumerated from its construction rules."""
    ch, mult, nrb = cfg["ch"], cfg["ch_mult"], cfg["num_res_blocks"]
    zc, ed, ne, res = cfg["z_channels"], cfg["embed_dim"], cfg["n_embed"], cfg["resolution"]
    keys: dict[str, tuple] = {}

    def conv(p, cin, cout, k):
        keys[p + ".weight"] = (cout, cin, k, k)
        keys[p + ".bias"] = (cout,)

    def norm(p, c):
        keys[p + ".weight"] = (c,)
        keys[p + ".bias"] = (c,)

    def res_block(p, cin, cout):
        norm(p + ".norm1", cin), conv(p + ".conv1", cin, cout, 3), norm(p + ".norm2", cout), conv(p + ".conv2", cout, cout, 3)
        if cin != cout:
            conv(p + ".nin_shortcut", cin, cout, 1)

    def attn(p, c):
        norm(p + ".norm", c)
        for n in ("q", "k", "v", "proj_out"):
            conv(f"{p}.{n}", c, c, 1)

    conv("encoder.conv_in", 3, ch, 3)
    in_mult = (1, *mult)
    r = res
    for i in range(len(mult)):
        cin = ch * in_mult[i]
        for j in range(nrb):
            res_block(f"encoder.down.{i}.block.{j}", cin, ch * mult[i])
            cin = ch * mult[i]
            if r in cfg["attn_resolutions"]:
                attn(f"encoder.down.{i}.attn.{j}", cin)
        if i != len(mult) - 1:
            conv(f"encoder.down.{i}.downsample.conv", cin, cin, 3)
            r //= 2
    top = ch * mult[-1]
    for part in ("encoder", "decoder"):
        res_block(f"{part}.mid.block_1", top, top), attn(f"{part}.mid.attn_1", top), res_block(f"{part}.mid.block_2", top, top)
    norm("encoder.norm_out", top), conv("encoder.conv_out", top, zc, 3)
    conv("decoder.conv_in", zc, top, 3)
    cin, r = top, res // 2 ** (len(mult) - 1)
    for i in reversed(range(len(mult))):
        for j in range(nrb + 1):
            res_block(f"decoder.up.{i}.block.{j}", cin, ch * mult[i])
            cin = ch * mult[i]
            if r in cfg["attn_resolutions"]:
                attn(f"decoder.up.{i}.attn.{j}", cin)
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", cin, cin, 3)
            r *= 2
    norm("decoder.norm_out", cin), conv("decoder.conv_out", cin, 3, 3)
    keys["quantize.embedding.weight"] = (ne, ed)
    conv("quant_conv", zc, ed, 1), conv("post_quant_conv", ed, zc, 1)
    return keys


def write_taming_ckpt(path: Path, cfg: dict, seed: int = 0, extra: dict | None = None, drop=(), reshape=None):
    """A Lightning checkpoint in taming's layout: random weights, loss.* extras, training metadata."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in taming_keys(cfg).items():
        if k in drop:
            continue
        if reshape and k in reshape:
            shape = reshape[k]
        if k.endswith("norm1.weight") or k.endswith("norm2.weight") or k.endswith("norm.weight") or "norm_out.weight" in k:
            sd[k] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif k == "quantize.embedding.weight":
            sd[k] = torch.randn(shape, generator=g)
        else:
            fan_in = max(1, int(torch.tensor(shape[1:]).prod())) if len(shape) > 1 else shape[0]
            sd[k] = torch.randn(shape, generator=g) / fan_in ** 0.5
    sd["loss.discriminator.main.0.weight"] = torch.randn(64, 3, 4, 4, generator=g)
    sd["loss.logvar"] = torch.zeros(())
    sd.update(extra or {})
    torch.save({"epoch": 3, "global_step": 1234, "pytorch-lightning_version": "1.0.8", "state_dict": sd}, path)
    return sd


# ---- the released config ----------------------------------------------------------------------
def test_f16_16384_config_has_taming_names_shapes_and_76m_params():
    cfg = CONFIGS["vqgan_imagenet_f16_16384"]
    with torch.device("meta"):
        tok = VQGAN("vqgan_imagenet_f16_16384")
    ours = {k: tuple(v.shape) for k, v in tok.state_dict().items()}
    assert ours == taming_keys(cfg)
    n = sum(p.numel() for p in tok.parameters())
    assert round(n / 1e6, 2) == 76.07, n
    # spot checks against the released checkpoint's layout
    assert ours["encoder.down.4.attn.1.q.weight"] == (512, 512, 1, 1)
    assert ours["decoder.up.0.block.0.conv1.weight"] == (128, 128, 3, 3)  # up.0 = highest resolution
    assert ours["decoder.up.4.attn.2.proj_out.weight"] == (512, 512, 1, 1)  # attention at 16x16
    assert ours["decoder.up.3.block.0.nin_shortcut.weight"] == (256, 512, 1, 1)
    assert "decoder.up.0.upsample.conv.weight" not in ours and "encoder.down.4.downsample.conv.weight" not in ours
    assert tok.grid == (16, 16) and tok.num_codes == 16384 and tok.image_size == (256, 256)


def test_conf_tokenizer_yamls_match_named_configs():
    from omegaconf import OmegaConf

    files = sorted((REPO / "conf" / "tokenizer").glob("*.yaml"))
    assert {f.stem for f in files} >= {"vqgan_imagenet_f16_16384", "vqgan_toy", "vqgan_test"}
    for f in files:
        spec = OmegaConf.to_container(OmegaConf.load(f), resolve=True)
        assert spec["name"] == "vqgan", f
        assert spec["config"] in CONFIGS, f
        cfg = VQGANConfig(**CONFIGS[spec["config"]])
        assert spec["num_codes"] == cfg.n_embed
        side = cfg.resolution // cfg.downsample_factor
        assert list(spec["grid"]) == [side, side]


# ---- loading a taming checkpoint ----------------------------------------------------------------
def test_taming_checkpoint_loads_strictly_and_matches_reference(tmp_path):
    ckpt = tmp_path / "last.ckpt"
    sd = write_taming_ckpt(ckpt, SMALL_F16)
    tok = VQGAN.from_taming(ckpt, dict(SMALL_F16))
    assert tok.grid == (4, 4) and tok.num_codes == 128
    for k, v in tok.state_dict().items():
        assert torch.equal(v, sd[k]), k
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    codes = tok.encode(x)
    ref_codes = ref_encode(sd, x)
    assert codes.shape == (2, 16) and codes.dtype == torch.int64
    assert torch.equal(codes, ref_codes)
    assert len(set(codes.flatten().tolist())) > 3  # a real test of the argmin, not one code everywhere
    img = tok.decode(codes)
    assert img.shape == (2, 3, 64, 64)
    torch.testing.assert_close(img, ref_decode(sd, codes, 4, 4), atol=1e-4, rtol=1e-4)


def test_taming_checkpoint_non_square_matches_reference(tmp_path):
    ckpt = tmp_path / "last.ckpt"
    sd = write_taming_ckpt(ckpt, SMALL_F16, seed=3)
    tok = VQGAN.from_taming(ckpt, dict(SMALL_F16), image_size=(64, 32))
    assert tok.grid == (4, 2)
    x = torch.rand(1, 3, 64, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    codes = tok.encode(x)
    assert torch.equal(codes, ref_encode(sd, x))
    torch.testing.assert_close(tok.decode(codes), ref_decode(sd, codes, 4, 2), atol=1e-4, rtol=1e-4)


def test_from_taming_reads_model_yaml(tmp_path):
    ckpt = tmp_path / "last.ckpt"
    write_taming_ckpt(ckpt, SMALL_F16)
    ddconfig = {k: (list(v) if isinstance(v, tuple) else v) for k, v in SMALL_F16.items()
                if k not in ("embed_dim", "n_embed")}
    ddconfig.update(double_z=False, in_channels=3, out_ch=3, dropout=0.0)
    yaml = tmp_path / "model.yaml"
    yaml.write_text(
        "model:\n  base_learning_rate: 4.5e-06\n  target: taming.models.vqgan.VQModel\n  params:\n"
        f"    embed_dim: {SMALL_F16['embed_dim']}\n    n_embed: {SMALL_F16['n_embed']}\n    ddconfig:\n"
        + "".join(f"      {k}: {json.dumps(v) if not isinstance(v, bool) else str(v)}\n" for k, v in ddconfig.items())
        + "    lossconfig:\n      target: taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator\n"
          "      params:\n        disc_start: 250001\n")
    tok = VQGAN.from_taming(ckpt, yaml)
    assert tok.config == VQGANConfig(**SMALL_F16)


@pytest.mark.slow
def test_full_size_f16_16384_taming_checkpoint_matches_reference(tmp_path):
    """The released architecture at full size (76M parameters, a ~300 MB checkpoint): strict load,
    codes and reconstruction equal to the functional reference on a 256x256 image."""
    cfg = CONFIGS["vqgan_imagenet_f16_16384"]
    ckpt = tmp_path / "last.ckpt"
    sd = write_taming_ckpt(ckpt, cfg)
    tok = VQGAN.from_taming(ckpt, "vqgan_imagenet_f16_16384")
    x = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0)) * 2 - 1
    codes = tok.encode(x)
    assert codes.shape == (1, 256)
    assert torch.equal(codes, ref_encode(sd, x))
    torch.testing.assert_close(tok.decode(codes), ref_decode(sd, codes, 16, 16), atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("kind", ["missing", "unexpected", "misshaped"])
def test_taming_checkpoint_key_errors_name_key_and_shapes(tmp_path, kind):
    ckpt = tmp_path / "bad.ckpt"
    if kind == "missing":
        write_taming_ckpt(ckpt, SMALL_F16, drop=("decoder.up.1.block.2.conv2.bias",))
        expect = ["missing key decoder.up.1.block.2.conv2.bias", "(32,)"]
    elif kind == "unexpected":
        write_taming_ckpt(ckpt, SMALL_F16, extra={"encoder.down.9.block.0.conv1.weight": torch.zeros(4, 4, 3, 3)})
        expect = ["unexpected key encoder.down.9.block.0.conv1.weight", "(4, 4, 3, 3)"]
    else:
        write_taming_ckpt(ckpt, SMALL_F16, reshape={"quantize.embedding.weight": (256, 24)})
        expect = ["mis-shaped key quantize.embedding.weight", "checkpoint (256, 24)", "model (128, 24)"]
    with pytest.raises(ValueError) as e:
        VQGAN.from_taming(ckpt, dict(SMALL_F16))
    for s in expect:
        assert s in str(e.value)


def test_taming_checkpoint_with_wrong_config_is_reported(tmp_path):
    ckpt = tmp_path / "last.ckpt"
    write_taming_ckpt(ckpt, SMALL_F16)
    with pytest.raises(ValueError, match=r"mis-shaped key encoder.conv_in.weight: checkpoint \(32, 3, 3, 3\) vs model \(64, 3, 3, 3\)"):
        VQGAN.from_taming(ckpt, dict(SMALL_F16, ch=64))


def test_taming_checkpoint_with_pickled_objects_is_refused(tmp_path):
    ckpt = tmp_path / "pickled.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": Path("x")}, ckpt)  # an arbitrary class
    with pytest.raises(ValueError, match="weights_only=True"):
        VQGAN.from_taming(ckpt, "vqgan_test")
    with pytest.raises(FileNotFoundError, match="not found"):
        VQGAN.from_taming(tmp_path / "nope.ckpt", "vqgan_test")


# ---- the interface -------------------------------------------------------------------------------
@pytest.mark.parametrize("size,grid", [((32, 32), (8, 8)), ((32, 16), (8, 4)), ((16, 48), (4, 12))])
def test_encode_decode_shapes(size, grid):
    torch.manual_seed(0)
    tok = VQGAN("vqgan_test", image_size=size)
    assert isinstance(tok, ImageTokenizer)
    assert tok.grid == grid and tok.image_size == size and tok.num_tokens == grid[0] * grid[1]
    x = torch.rand(3, 3, *size) * 2 - 1
    codes = tok.encode(x)
    assert codes.shape == (3, grid[0] * grid[1]) and codes.dtype == torch.int64
    assert int(codes.min()) >= 0 and int(codes.max()) < tok.num_codes
    out = tok.decode(codes)
    assert out.shape == (3, 3, *size) and out.dtype == torch.float32
    assert torch.equal(tok.decode(codes.reshape(3, *grid)), out)  # (B, gh, gw) also accepted


class _BlockMean(nn.Module):
    """A purely local stand-in encoder: the mean of channel 0 over each f x f block."""

    def __init__(self, f):
        super().__init__()
        self.f = f

    def forward(self, x):
        return F.avg_pool2d(x[:, :1], self.f)


class _BlockPaint(nn.Module):
    """A purely local stand-in decoder: paint each block with its latent's channel 0."""

    def __init__(self, f):
        super().__init__()
        self.f = f

    def forward(self, z):
        return F.interpolate(z[:, :1], scale_factor=self.f, mode="nearest").repeat(1, 3, 1, 1)


def test_code_order_is_row_major():
    tok = VQGAN(dict(CONFIGS["vqgan_test"], embed_dim=1, z_channels=32), image_size=(32, 16))
    gh, gw = tok.grid  # 8 x 4
    f = tok.downsample_factor
    n = gh * gw
    tok.encoder = _BlockMean(f)
    tok.decoder = _BlockPaint(f)
    with torch.no_grad():
        tok.quant_conv = nn.Conv2d(1, 1, 1)
        tok.quant_conv.weight.fill_(1.0), tok.quant_conv.bias.zero_()
        tok.post_quant_conv = nn.Conv2d(1, 1, 1)
        tok.post_quant_conv.weight.fill_(1.0), tok.post_quant_conv.bias.zero_()
        levels = torch.linspace(-0.9, 0.9, tok.num_codes)
        tok.quantize.embedding.weight.copy_(levels[:, None])  # code i <-> value levels[i]
    # block (r, c) of the image gets the level of code r * gw + c
    img = torch.zeros(1, 3, 32, 16)
    for r in range(gh):
        for c in range(gw):
            img[..., r * f:(r + 1) * f, c * f:(c + 1) * f] = levels[r * gw + c]
    codes = tok.encode(img)
    assert codes.tolist() == [list(range(n))]
    out = tok.decode(codes)
    torch.testing.assert_close(out, img)
    # and a single changed code only changes its own block (row r = k // gw, column c = k % gw)
    k = 13
    codes2 = codes.clone()
    codes2[0, k] = 60
    diff = (tok.decode(codes2) - out).abs().sum(1)[0] > 0
    r, c = divmod(k, gw)
    expect = torch.zeros_like(diff)
    expect[r * f:(r + 1) * f, c * f:(c + 1) * f] = True
    assert torch.equal(diff, expect)


def test_quantizer_picks_nearest_and_breaks_ties_to_lowest_index():
    q = VectorQuantizer(6, 2)
    with torch.no_grad():
        q.embedding.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 1.0], [-2.0, 0.0], [5.0, 5.0], [-2.0, 0.0]]))
    z = torch.tensor([[1.1, 0.9], [-1.9, 0.2], [0.1, -0.1], [4.0, 4.0]])  # -> 1 (tie with 2), 3 (tie with 5), 0, 4
    assert q.nearest(z).tolist() == [1, 3, 0, 4]
    # a small chunk size gives the same answer as one block
    q.chunk_elems = 6
    assert q.nearest(z).tolist() == [1, 3, 0, 4]
    # bf16 autocast does not change the distances' precision
    torch.manual_seed(0)
    q2 = VectorQuantizer(512, 16)
    with torch.no_grad():
        q2.embedding.weight.normal_()
    zz = torch.randn(300, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = q2.nearest(zz)
    assert torch.equal(got, torch.cdist(zz.double(), q2.embedding.weight.double()).argmin(1))


def test_input_validation_errors_are_clear():
    tok = VQGAN("vqgan_test")
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        tok.encode(torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        tok.encode(torch.zeros(1, 1, 32, 32))
    with pytest.raises(TypeError, match="float"):
        tok.encode(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"32x32 \(H x W\).*got 64x64"):
        tok.encode(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        tok.encode(torch.full((1, 3, 32, 32), 2.5))
    with pytest.raises(ValueError, match=r"\(B, 64\)"):
        tok.decode(torch.zeros(1, 63, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        tok.decode(torch.full((1, 64), 64))
    with pytest.raises(TypeError, match="integer"):
        tok.decode(torch.zeros(1, 64))
    with pytest.raises(ValueError, match="divisible by the downsampling factor 4"):
        VQGAN("vqgan_test", image_size=(30, 32))
    with pytest.raises(ValueError, match="unknown VQ-GAN config 'nope'"):
        VQGAN("nope")
    with pytest.raises(ValueError, match="divisible by 32"):
        VQGAN(dict(CONFIGS["vqgan_test"], ch=48))
    with pytest.raises(ValueError, match=r"unknown VQ-GAN config field\(s\) \['chmult'\]"):
        VQGAN({"chmult": [1, 2]})


def test_freeze_keeps_eval_and_no_grad():
    tok = VQGAN("vqgan_test").freeze()
    holder = nn.Module()
    holder.tok = tok
    holder.train()
    assert tok.frozen and not tok.training and not any(p.requires_grad for p in tok.parameters())


# ---- saving, specs and the registry ---------------------------------------------------------------
def test_save_pretrained_round_trip_and_build_from_spec(tmp_path, monkeypatch):
    monkeypatch.setenv("UIO_HOME", str(tmp_path / "home"))
    torch.manual_seed(0)
    tok = VQGAN("vqgan_test")
    out = tok.save_pretrained(tmp_path / "home" / "tokenizers" / "mine")
    assert (out / "model.safetensors").is_file() and json.loads((out / "config.json").read_text())["name"] == "vqgan"
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    for loaded in (VQGAN.from_pretrained(out), VQGAN.from_pretrained(out / "model.safetensors"),
                   build_image_tokenizer({"name": "vqgan", "config": "vqgan_test", "weights": "tokenizers/mine"}),
                   build_image_tokenizer({"name": "vqgan", "weights": str(out), "num_codes": 64, "grid": [8, 8]})):
        assert torch.equal(loaded.encode(x), tok.encode(x))
        torch.testing.assert_close(loaded.decode(tok.encode(x)), tok.decode(tok.encode(x)))
    # spec() rebuilds the architecture (weights travel in the owner's state dict)
    rebuilt = build_image_tokenizer(tok.spec())
    rebuilt.load_state_dict(tok.state_dict())
    assert torch.equal(rebuilt.encode(x), tok.encode(x))
    with pytest.raises(ValueError, match="spec says num_codes=512"):
        build_image_tokenizer({"name": "vqgan", "config": "vqgan_test", "num_codes": 512})
    with pytest.raises(ValueError, match="weights in .* are for VQ-GAN config"):
        build_image_tokenizer({"name": "vqgan", "config": "vqgan_toy", "weights": str(out)})
    with pytest.raises(FileNotFoundError, match="vqgan_toyworld"):
        build_image_tokenizer({"name": "vqgan", "config": "vqgan_toy", "weights": "tokenizers/absent"})
    with pytest.raises(ValueError, match="unknown image tokenizer 'dalle'"):
        build_image_tokenizer({"name": "dalle"})
    with pytest.raises(ValueError, match=r"unknown vqgan spec key\(s\) \['weight'\]"):
        build_image_tokenizer({"name": "vqgan", "weight": "x"})


def test_a_new_tokenizer_plugs_in_through_the_registry():
    @register_image_tokenizer("test_pixelbins")
    class PixelBins(ImageTokenizer):
        """Each 4x4 block's mean gray level, quantised into 16 bins."""

        def __init__(self, size=8):
            super().__init__()
            self.num_codes, self.grid, self.image_size = 16, (size // 4, size // 4), (size, size)

        def _encode(self, images):
            g = F.avg_pool2d(images.mean(1, keepdim=True), 4)
            return ((g + 1) / 2 * 15).round().long().flatten(1)

        def _decode(self, codes):
            g = codes.float().reshape(-1, 1, *self.grid) / 15 * 2 - 1
            return F.interpolate(g, scale_factor=4.0).repeat(1, 3, 1, 1)

        def spec(self):
            return {"name": "test_pixelbins", "size": self.image_size[0]}

        @classmethod
        def from_spec(cls, spec):
            return cls(spec.get("size", 8))

    assert "test_pixelbins" in available_image_tokenizers()
    tok = build_image_tokenizer({"name": "test_pixelbins", "size": 16})
    x = torch.zeros(1, 3, 16, 16)
    assert tok.encode(x).shape == (1, 16) and tok.decode(tok.encode(x)).shape == (1, 3, 16, 16)
    with pytest.raises(ValueError, match="already registered"):
        register_image_tokenizer("test_pixelbins")(PixelBins)


# ---- swapping the tokenizer through the config group, inside uio.Model ---------------------------
class _GrayBlocks(ImageTokenizer):
    """Another tokenizer for the plug-in test: each f x f block's mean grey level in ``levels`` bins
    (the bins' grey values are its one parameter)."""

    def __init__(self, image_size=(32, 32), f=4, levels=32):
        super().__init__()
        self.f, self.num_codes = f, levels
        self.gray = nn.Parameter(torch.linspace(-1, 1, levels))
        self.image_size = tuple(image_size)
        self.grid = (self.image_size[0] // f, self.image_size[1] // f)

    def _encode(self, images):
        g = F.avg_pool2d(images.mean(1, keepdim=True), self.f)  # (B, 1, gh, gw)
        return ((g.clamp(-1, 1) + 1) / 2 * (self.num_codes - 1)).round().long().flatten(1)

    def _decode(self, codes):
        g = self.gray[codes].reshape(-1, 1, *self.grid)
        return F.interpolate(g, scale_factor=float(self.f)).repeat(1, 3, 1, 1)

    def spec(self):
        return {"name": "test_grayblocks", "image_size": list(self.image_size), "f": self.f, "levels": self.num_codes}

    @classmethod
    def from_spec(cls, spec):
        return cls(spec.get("image_size", (32, 32)), spec.get("f", 4), spec.get("levels", 32))


register_image_tokenizer("test_grayblocks")(_GrayBlocks)


def _compose_tokenizer(name: str) -> dict:
    """The `tokenizer` group alone, composed by Hydra from the repository's conf/ (as uio-train does)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose(overrides=[f"+tokenizer={name}"])
    return OmegaConf.to_container(cfg.tokenizer, resolve=True)


@pytest.mark.parametrize("source", ["conf_group_vqgan_test", "new_tokenizer_config"])
def test_tokenizer_swapped_through_config_works_in_model(tmp_path, source):
    from omegaconf import OmegaConf

    from uio import Model, ModelConfig

    if source == "conf_group_vqgan_test":
        spec = _compose_tokenizer("vqgan_test")
        expect = VQGAN
    else:  # another tokenizer: implement the interface, register it, add a config
        cfg_file = tmp_path / "grayblocks.yaml"
        cfg_file.write_text("name: test_grayblocks\nimage_size: [32, 32]\nf: 4\nlevels: 32\nnum_codes: 32\ngrid: [8, 8]\n")
        spec = OmegaConf.to_container(OmegaConf.load(cfg_file))
        expect = _GrayBlocks
    torch.manual_seed(0)
    cfg = ModelConfig.from_size("tiny", text_vocab=300, image_vocab=spec["num_codes"], image_target_grid=spec["grid"],
                                image_target_size=spec["image_size"], image_tokenizer=spec, image_input_size=(32, 32),
                                d_model=128, num_heads=2, d_ff=256, num_encoder_layers=2, num_decoder_layers=2)
    model = Model(cfg)
    tok = model.image_tokenizer
    assert isinstance(tok, expect) and tok.frozen
    b = 2
    g = torch.Generator().manual_seed(0)
    n_img = tok.grid[0] * tok.grid[1]
    batch = dict(text_inputs=torch.tensor([[5, 6, 1], [7, 1, 0]]), image_inputs=torch.randn(b, 3, 32, 32, generator=g),
                 image_input_masks=torch.ones(b, cfg.encoder_max_image_len, dtype=torch.bool),
                 text_targets=torch.tensor([[1], [1]]),
                 image_targets=torch.rand(b, 3, 32, 32, generator=g) * 2 - 1,
                 image_target_masks=torch.ones(b, n_img, dtype=torch.bool), tasks=["depth"] * b, meta=[{}] * b)
    out = model(batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is None for p in tok.parameters())
    # the targets were tokenised by this tokenizer: passing its codes gives the same loss
    codes = tok.encode(batch["image_targets"])
    by_codes = model({**{k: v for k, v in batch.items() if k != "image_targets"}, "image_target_codes": codes})
    torch.testing.assert_close(out.loss, by_codes.loss)
    gen = model.eval().generate(batch, max_text_len=2, image_output=True)
    assert gen.image_codes.shape == (b, n_img) and gen.images.shape == (b, 3, 32, 32)
    torch.testing.assert_close(gen.images, tok.decode(gen.image_codes))

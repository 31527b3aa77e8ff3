"""Position information of the Unified-IO network: three parts, as in the original.

1. Learned absolute position embeddings (tables live in the encoder/decoder modules).
2. An absolute-position attention bias (TUPE-style): the normalised position embeddings are
   projected to per-head queries and keys and ``q.k * (d_model / heads) ** -0.5`` is added to the
   attention logits -- note ``d_model / heads``, not ``head_dim`` (:func:`absolute_position_bias`).
3. Relative position biases, one :class:`RelativePositionBiases` per stack shared by its layers:
   T5 buckets between text tokens (32 buckets, max distance 128; bidirectional in the encoder,
   causal in the decoder), a 2-D bucket scheme between image patches (8 buckets per axis, max
   distance 20, four quadrants: 4 * 8 * 8 = 256 buckets) and **zero** between text and image.

Bucket formulas follow ``RelativePositionBiases`` in the original ``uio/t5x_layers.py``, including
the ``+ float32 eps`` inside the logarithm and the float32 arithmetic (it decides ties such as a
distance of exactly 16 -> bucket 10). Bucket tables are cached per grid and device, the combined
(text + image) index tables of the most recent layouts in a small LRU.
"""
from __future__ import annotations

import math

import torch
from torch import nn

_F32_EPS = float(torch.finfo(torch.float32).eps)


def _log_bucket(n: torch.Tensor, max_exact: int, max_distance: int, num_buckets: int) -> torch.Tensor:
    """Logarithmic bucket of distances ``n >= max_exact`` in float32, clipped to ``num_buckets - 1``."""
    ratio = torch.log(n.to(torch.float32) / max_exact + _F32_EPS)
    denom = torch.log(torch.tensor(max_distance / max_exact, dtype=torch.float32, device=n.device))
    large = max_exact + (ratio / denom * (num_buckets - max_exact)).to(torch.long)
    return torch.clamp(large, max=num_buckets - 1)


def relative_position_bucket(relative_position: torch.Tensor, bidirectional: bool = True,
                             num_buckets: int = 32, max_distance: int = 128) -> torch.Tensor:
    """T5 bucket of ``relative_position = key_pos - query_pos`` (int tensor) -> [0, num_buckets).

    Bidirectional: half the buckets for keys before the query, half (offset by num_buckets/2) for
    keys after it. Causal: keys after the query all fall in bucket 0.
    """
    ret = torch.zeros_like(relative_position, dtype=torch.long)
    n = -relative_position.to(torch.long)
    if bidirectional:
        num_buckets //= 2
        ret = ret + (n < 0).long() * num_buckets
        n = n.abs()
    else:
        n = n.clamp(min=0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    return ret + torch.where(is_small, n, _log_bucket(n, max_exact, max_distance, num_buckets))


def image_relative_position_bucket(relative_x: torch.Tensor, relative_y: torch.Tensor, num_buckets: int = 8,
                                   max_distance: int = 20) -> torch.Tensor:
    """2-D bucket of a patch pair (``relative_* = key - query`` along each axis) -> [0, 4 * nb^2).

    With ``nx = -relative_x``, ``ny = -relative_y``: quadrant 3 if nx <= 0 and ny < 0, 2 if nx < 0
    and ny >= 0, 1 if nx > 0 and ny <= 0, else 0; inside a quadrant ``bx(|nx|) + nb * by(|ny|)``
    with T5's exact/logarithmic split per axis.
    """
    nx = -relative_x.to(torch.long)
    ny = -relative_y.to(torch.long)
    total = num_buckets**2
    ret = ((nx <= 0) & (ny < 0)).long() * (3 * total)
    ret = ret + ((nx < 0) & (ny >= 0)).long() * (2 * total)
    ret = ret + ((nx > 0) & (ny <= 0)).long() * total
    nx, ny = nx.abs(), ny.abs()
    max_exact = num_buckets // 2
    bx = torch.where(nx < max_exact, nx, _log_bucket(nx, max_exact, max_distance, num_buckets))
    by = torch.where(ny < max_exact, ny, _log_bucket(ny, max_exact, max_distance, num_buckets))
    return ret + bx + num_buckets * by


class RelativePositionBiases(nn.Module):
    """Relative attention biases of one stack: ``rel_embedding`` (H, 32) for text pairs,
    ``image_rel_embedding`` (H, 256) for patch pairs, nothing between text and image.

    Internally the two tables and one zero column are concatenated so that a single gather with a
    cached (L, L) index table produces the whole block-diagonal bias.
    """

    def __init__(self, num_heads: int, num_buckets: int = 32, max_distance: int = 128, img_num_buckets: int = 8,
                 img_max_distance: int = 20):
        super().__init__()
        self.num_heads = num_heads
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.img_num_buckets = img_num_buckets
        self.img_max_distance = img_max_distance
        self.num_image_buckets = 4 * img_num_buckets**2
        self.rel_embedding = nn.Parameter(torch.empty(num_heads, num_buckets))
        self.image_rel_embedding = nn.Parameter(torch.empty(num_heads, self.num_image_buckets))
        self._cache: dict[tuple, torch.Tensor] = {}  # bucket tables
        self._index_cache: dict[tuple, torch.Tensor] = {}  # combined (L, L) layouts, LRU
        self.max_cached_layouts = 16

    def reset_parameters(self) -> None:
        from uio.modeling.layers import uniform_fan_avg_

        # Flax variance_scaling(1, 'fan_avg', 'uniform') on a (heads, buckets) table
        uniform_fan_avg_(self.rel_embedding, self.num_heads, self.num_buckets)
        uniform_fan_avg_(self.image_rel_embedding, self.num_heads, self.num_image_buckets)

    @property
    def zero_index(self) -> int:
        """Index of the zero column used for text<->image pairs."""
        return self.num_buckets + self.num_image_buckets

    # ---- cached index tables ------------------------------------------------------------------
    def text_buckets(self, length: int, bidirectional: bool, device: torch.device) -> torch.Tensor:
        """(L, L) T5 buckets for text positions 0..L-1 (query rows, key columns).

        Buckets depend on the distance only, so one table of the longest length seen is kept and
        sliced (bounded memory however many text lengths training produces)."""
        key = ("text", bidirectional, str(device))
        table = self._cache.get(key)
        if table is None or table.shape[0] < length:
            n = max(length, 64 if table is None else 2 * table.shape[0])
            pos = torch.arange(n, device=device)
            table = relative_position_bucket(pos[None, :] - pos[:, None], bidirectional, self.num_buckets,
                                             self.max_distance)
            self._cache[key] = table
        return table[:length, :length]

    def image_buckets(self, grid: tuple[int, int], device: torch.device) -> torch.Tensor:
        """(P, P) 2-D buckets between all patches of a ``grid`` (rows, cols), row-major ids."""
        key = ("image", tuple(grid), str(device))
        if key not in self._cache:
            gh, gw = grid
            ids = torch.arange(gh * gw, device=device)
            x, y = ids % gw, ids // gw
            self._cache[key] = image_relative_position_bucket(x[None, :] - x[:, None], y[None, :] - y[:, None],
                                                              self.img_num_buckets, self.img_max_distance)
        return self._cache[key]

    def index(self, text_len: int, image_ids: torch.Tensor | None, grid: tuple[int, int], bidirectional: bool,
              device: torch.device) -> torch.Tensor:
        """(1|B, Lt+Li, Lt+Li) indices into the concatenated tables.

        ``image_ids``: None for all patches of ``grid`` in order, else (1|B, Li) row-major patch ids.
        """
        if image_ids is None:
            key = ("index", text_len, tuple(grid), bidirectional, str(device))
            if key in self._index_cache:
                self._index_cache[key] = self._index_cache.pop(key)  # most recently used last
                return self._index_cache[key]
        nt = text_len
        full = self.image_buckets(grid, device) if grid[0] * grid[1] else None
        if image_ids is None:
            img = (full + self.num_buckets)[None] if full is not None else torch.zeros(1, 0, 0, dtype=torch.long,
                                                                                       device=device)
        else:
            ids = image_ids.to(device=device, dtype=torch.long)
            img = full[ids[:, :, None], ids[:, None, :]] + self.num_buckets  # (B, Li, Li)
        b, ni = img.shape[0], img.shape[1]
        out = torch.full((b, nt + ni, nt + ni), self.zero_index, dtype=torch.long, device=device)
        if nt:
            out[:, :nt, :nt] = self.text_buckets(nt, bidirectional, device)
        if ni:
            out[:, nt:, nt:] = img
        if image_ids is None:
            self._index_cache[key] = out
            while len(self._index_cache) > self.max_cached_layouts:  # LRU: layouts vary with text length
                self._index_cache.pop(next(iter(self._index_cache)))
        return out

    def forward(self, text_len: int, image_ids: torch.Tensor | None, grid: tuple[int, int],
                bidirectional: bool) -> torch.Tensor:
        """Bias (1|B, H, Lt+Li, Lt+Li) for ``text_len`` text tokens followed by image patches."""
        idx = self.index(text_len, image_ids, grid, bidirectional, self.rel_embedding.device)
        zero = self.rel_embedding.new_zeros(self.num_heads, 1)
        table = torch.cat([self.rel_embedding, self.image_rel_embedding, zero], dim=1)  # (H, nb + nib + 1)
        return table[:, idx].permute(1, 0, 2, 3)  # (B, H, L, L)


def absolute_position_bias(pos_emb: torch.Tensor, q_linear: nn.Linear, k_linear: nn.Linear, num_heads: int,
                           d_model: int, kv_pos_emb: torch.Tensor | None = None) -> torch.Tensor:
    """``einsum('bqhd,bkhd->bhqk', q(pos), k(pos)) * (d_model / heads) ** -0.5`` -> (B, H, Lq, Lk).

    ``pos_emb``: the layer-normed position embeddings (B|1, L, d).
    """
    kv = pos_emb if kv_pos_emb is None else kv_pos_emb
    b, lq, _ = pos_emb.shape
    q = q_linear(pos_emb).view(b, lq, num_heads, -1).transpose(1, 2)  # (B, H, Lq, Dh)
    k = k_linear(kv).view(kv.shape[0], kv.shape[1], num_heads, -1).transpose(1, 2)  # (B, H, Lk, Dh)
    scale = float(d_model / num_heads) ** -0.5
    return torch.matmul(q, k.transpose(-1, -2)) * scale


# ---- resizing image position embeddings ------------------------------------------------------
def _keys_cubic(x: torch.Tensor) -> torch.Tensor:
    """Keys cubic kernel with a = -0.5 (``jax.image`` 'bicubic')."""
    x = x.abs()
    near = ((1.5 * x - 2.5) * x) * x + 1.0
    far = ((-0.5 * x + 2.5) * x - 4.0) * x + 2.0
    return torch.where(x >= 2.0, torch.zeros_like(x), torch.where(x >= 1.0, far, near))


def _resize_weights(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) interpolation matrix of ``jax.image.resize(method='bicubic', antialias=True)``:
    half-pixel centres, the kernel widened by the scale when downsampling, rows normalised."""
    scale = n_out / n_in
    inv = 1.0 / scale
    kernel_scale = max(inv, 1.0)
    sample = (torch.arange(n_out, dtype=torch.float64) + 0.5) * inv - 0.5  # (n_out,)
    dist = (sample[:, None] - torch.arange(n_in, dtype=torch.float64)[None, :]).abs() / kernel_scale
    w = _keys_cubic(dist)
    total = w.sum(1, keepdim=True)
    w = torch.where(total.abs() > 1000 * _F32_EPS, w / torch.where(total != 0, total, torch.ones_like(total)),
                    torch.zeros_like(w))
    inside = (sample >= -0.5) & (sample <= n_in - 0.5)
    return w * inside[:, None]


def resize_position_embeddings(table: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]) -> torch.Tensor:
    """Bicubically resize image position embeddings (gh*gw, d) from ``old_grid`` to ``new_grid``,
    as the original does when an image has a different number of patches (separable Keys cubic,
    antialiased when shrinking, the formula of ``jax.image.resize``)."""
    (oh, ow), (nh, nw) = old_grid, new_grid
    d = table.shape[-1]
    if table.shape[0] != oh * ow:
        raise ValueError(f"position table has {table.shape[0]} rows, expected {oh}x{ow}={oh * ow}")
    if (oh, ow) == (nh, nw):
        return table
    wh = _resize_weights(oh, nh).to(table)  # (nh, oh)
    ww = _resize_weights(ow, nw).to(table)  # (nw, ow)
    grid = table.view(oh, ow, d)
    out = torch.einsum("ij,jkd->ikd", wh, grid)
    out = torch.einsum("lk,ikd->ild", ww, out)
    return out.reshape(nh * nw, d)


def sincos_table(coords: torch.Tensor, dim: int, span: float) -> torch.Tensor:
    """(n, dim) sin-cos features of 1-D coordinates ``coords`` (n,) that range over ``[0, span)``.

    ``dim // 2`` frequencies, geometric from a period of ``2 * span`` (one half-wave over the whole
    range) down to a period of 8 units, scaled by sqrt(2) so every entry has mean square 1, like the
    N(0, 1) tables it replaces. The dot product of two rows depends only on the coordinates'
    difference and peaks where they are equal: an ordinal code."""
    if dim < 2 or dim % 2:
        raise ValueError(f"sincos_table needs an even dim >= 2, got {dim}")
    k = torch.arange(dim // 2, dtype=torch.float64)
    shortest = min(8.0, 2.0 * span)
    freqs = (2 * math.pi / (2 * span)) * ((2 * span / shortest) ** (k / max(dim // 2 - 1, 1)))
    angles = coords.to(torch.float64)[:, None] * freqs[None]
    table = torch.stack([angles.sin(), angles.cos()], dim=-1).reshape(len(coords), dim)
    return (table * math.sqrt(2.0)).float()


def grid_sincos_table(grid: tuple[int, int], dim: int, span: float) -> torch.Tensor:
    """(gh*gw, dim) row-major 2-D sin-cos table of a cell grid covering ``[0, span)`` on each axis:
    the first half of the features encodes the cell centre's row, the second half its column (both
    as :func:`sincos_table` of ``dim // 2`` features)."""
    gh, gw = grid
    if dim % 4:
        raise ValueError(f"grid_sincos_table needs dim divisible by 4, got {dim}")
    rows = (torch.arange(gh, dtype=torch.float64) + 0.5) * span / gh
    cols = (torch.arange(gw, dtype=torch.float64) + 0.5) * span / gw
    rr, cc = torch.meshgrid(rows, cols, indexing="ij")
    return torch.cat([sincos_table(rr.reshape(-1), dim // 2, span), sincos_table(cc.reshape(-1), dim // 2, span)], 1)


def init_embedding_(w: torch.Tensor, std: float = 1.0) -> torch.Tensor:
    """Flax ``normal(stddev=1.0)`` used for the token, position and segment tables."""
    return nn.init.normal_(w, 0.0, std)


__all__ = ["relative_position_bucket", "image_relative_position_bucket", "RelativePositionBiases",
           "absolute_position_bias", "resize_position_embeddings", "init_embedding_",
           "sincos_table", "grid_sincos_table"]

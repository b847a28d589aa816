"""A SiT written down in code (Ma et al., 2024, whose network is DiT's, Peebles and Xie, 2023).

The parameters carry the names and shapes of the reference code, and of :class:`coap_bench.memory.SiT`,
the layout ``coap-bench memory`` counts (a test checks the two agree for SiT-XL/2): patch embedding
``x_embedder.proj`` (a conv with kernel = stride = patch), timestep MLP ``t_embedder.mlp`` on 256
sinusoidal frequencies of ``t`` in ``[0, 1]`` as SiT passes it, class table ``y_embedder.embedding_table``
(one extra row, the null class of classifier-free guidance, when labels are dropped in training), a frozen
2-D sin-cos position embedding ``pos_embed``, then ``depth`` blocks of attention (fused ``qkv``) and MLP
(GELU, tanh) under adaLN-Zero modulation, and ``final_layer``. LayerNorms have no affine parameters; the
modulation layers and the output layer start at zero, as in the reference initialisation, so the model
starts as the zero map.

``diffusers.DiTTransformer2DModel`` is not used: it gives every block its own timestep and class
embedders, which changes the parameter count (750M where SiT-XL/2 has 675M) and with it the
optimizer memory the benchmark measures.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .presets import SIT_PRESETS, SitPreset

__all__ = [
    "FREQUENCY_EMBEDDING_SIZE",
    "SiT",
    "build_sit",
    "count_parameters",
    "sincos_position_embedding",
    "timestep_embedding",
]

#: Sinusoidal frequencies of the timestep embedding (SiT's ``frequency_embedding_size``).
FREQUENCY_EMBEDDING_SIZE = 256
_NORM_EPS = 1e-6


def timestep_embedding(t: Tensor, dim: int = FREQUENCY_EMBEDDING_SIZE, max_period: float = 10_000.0) -> Tensor:
    """``[cos(t f_k), sin(t f_k)]`` over ``dim / 2`` geometric frequencies ``f_k`` from 1 to ``1 / max_period``.

    >>> timestep_embedding(torch.zeros(2)).shape
    torch.Size([2, 256])
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_position_embedding(hidden: int, grid: int) -> Tensor:
    """The fixed 2-D sin-cos embedding of a ``grid`` x ``grid`` token map, ``(grid * grid, hidden)``: half of
    the channels encode the row, half the column (MAE's / DiT's construction)."""
    if hidden % 4:
        raise ValueError(f"the sin-cos position embedding needs hidden divisible by 4, got {hidden}")
    quarter = hidden // 4
    omega = 1.0 / 10_000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(
        torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing="ij"
    )

    def encode(positions: Tensor) -> Tensor:
        angles = positions.reshape(-1, 1) * omega[None]
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)

    # DiT's order: the first half from the column index (its grid[0]), the second from the row.
    return torch.cat([encode(cols), encode(rows)], dim=1).float()


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch`` x ``patch`` patches to tokens: ``(N, C, H, W) -> (N, H W / patch^2, hidden)``."""

    def __init__(self, in_channels: int, hidden: int, patch: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden, patch, stride=patch)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(FREQUENCY_EMBEDDING_SIZE, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(timestep_embedding(t).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels to vectors; with ``null_class``, row ``num_classes`` is the dropped (unconditional) label."""

    def __init__(self, num_classes: int, hidden: int, null_class: bool) -> None:
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(null_class), hidden)

    def forward(self, labels: Tensor) -> Tensor:
        return self.embedding_table(labels)


class Attention(nn.Module):
    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden size {hidden} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x: Tensor) -> Tensor:
        n, tokens, hidden = x.shape
        q, k, v = self.qkv(x).reshape(n, tokens, 3, self.heads, hidden // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(n, tokens, hidden))


class Mlp(nn.Module):
    def __init__(self, hidden: int, mlp_hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden, mlp_hidden)
        self.fc2 = nn.Linear(mlp_hidden, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiTBlock(nn.Module):
    """Attention and MLP, each between a LayerNorm modulated by the conditioning (shift, scale) and a gate."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=_NORM_EPS)
        self.attn = Attention(hidden, heads)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=_NORM_EPS)
        self.mlp = Mlp(hidden, int(hidden * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate1.unsqueeze(1) * self.attn(_modulate(self.norm1(x), shift1, scale1))
        return x + gate2.unsqueeze(1) * self.mlp(_modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    def __init__(self, hidden: int, patch: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=_NORM_EPS)
        self.linear = nn.Linear(hidden, patch * patch * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(_modulate(self.norm_final(x), shift, scale))


class SiT(nn.Module):
    """SiT's network: ``forward(x, t, labels)`` is the predicted velocity, the shape of ``x``.

    ``x`` is ``(N, in_channels, input_size, input_size)``, ``t`` ``(N,)`` in ``[0, 1]``, ``labels`` ``(N,)``
    class indices (``num_classes`` is the null class when ``null_class``). With ``learn_sigma`` the output
    layer also has the variance channels of the reference model, which the velocity objective ignores
    (SiT keeps them for DiT's layout and drops them in ``forward``).
    """

    def __init__(
        self,
        *,
        input_size: int = 32,
        patch: int = 2,
        in_channels: int = 4,
        hidden: int = 1152,
        depth: int = 28,
        heads: int = 16,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        null_class: bool = True,
        learn_sigma: bool = True,
    ) -> None:
        super().__init__()
        if input_size % patch:
            raise ValueError(f"input size {input_size} is not a multiple of the patch size {patch}")
        self.in_channels, self.patch, self.learn_sigma = in_channels, patch, learn_sigma
        self.num_classes, self.null_class = num_classes, null_class
        self.grid = input_size // patch
        out_channels = 2 * in_channels if learn_sigma else in_channels
        self.x_embedder = PatchEmbed(in_channels, hidden, patch)
        self.t_embedder = TimestepEmbedder(hidden)
        self.y_embedder = LabelEmbedder(num_classes, hidden, null_class)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid**2, hidden), requires_grad=False)
        self.blocks = nn.ModuleList(SiTBlock(hidden, heads, mlp_ratio) for _ in range(depth))
        self.final_layer = FinalLayer(hidden, patch, out_channels)
        if self.pos_embed.device.type != "meta":
            self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """The reference initialisation: Xavier-uniform linears and patch conv, N(0, 0.02) class table and
        timestep MLP, zero biases, and zero adaLN modulation and output layer (adaLN-Zero)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        weight = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        self.pos_embed.copy_(sincos_position_embedding(self.pos_embed.shape[-1], self.grid)[None])
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for layer in [*(block.adaLN_modulation[-1] for block in self.blocks), self.final_layer.adaLN_modulation[-1]]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, tokens: Tensor) -> Tensor:
        """``(N, grid^2, patch^2 C) -> (N, C, grid patch, grid patch)``."""
        n, p, g = tokens.shape[0], self.patch, self.grid
        channels = tokens.shape[-1] // (p * p)
        x = tokens.reshape(n, g, g, p, p, channels)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(n, channels, g * p, g * p)

    def forward(self, x: Tensor, t: Tensor, labels: Tensor) -> Tensor:
        tokens = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(labels)
        for block in self.blocks:
            tokens = block(tokens, c)
        out = self.unpatchify(self.final_layer(tokens, c))
        return out[:, : self.in_channels] if self.learn_sigma else out


def build_sit(preset: SitPreset | str, *, seed: int = 0, device: torch.device | str = "cpu") -> SiT:
    """The SiT of ``preset``, initialised from ``seed`` without touching the global RNG; on ``meta``: shapes only.

    >>> build_sit("micro", device="meta").grid
    4
    """
    preset = SIT_PRESETS[preset] if isinstance(preset, str) else preset
    if torch.device(device).type == "meta":
        with torch.device("meta"):
            return SiT(**preset.model_config())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SiT(**preset.model_config())
    return model.to(device)


def count_parameters(preset: SitPreset | str) -> int:
    """Trainable parameters of ``preset``'s SiT, counted on the meta device (no memory, no weights).

    >>> count_parameters("xl-2")
    674834720
    """
    return sum(p.numel() for p in build_sit(preset, device="meta").parameters() if p.requires_grad)

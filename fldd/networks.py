"""Time-conditioned networks over token positions.

Both networks map inputs over D positions plus integer steps t to D x out logits:
- the reverse network v_theta(z_t, t): inputs are latent states (hard tokens, or soft one-hot
  vectors during the Concrete warm-up), time enters the trunk;
- the learned forward network f_phi(x, t): inputs are data tokens. Its trunk sees x only and time
  enters only the output head, so u(x,t) and u(x,s) come from one trunk pass (training cost).

`forward(inputs, t)` accepts t of shape (B,) -> (B, D, out), or (B, n) -> (B, n, D, out).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fldd.config import NetworkConfig


def timestep_embedding(t: Tensor, num_steps: int, dim: int) -> Tensor:
    """Sinusoidal embedding of the time fraction t / T."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = (t.float() / num_steps * 1000.0)[..., None] * freqs
    emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    return F.pad(emb, (0, dim % 2))


class TimeEmbedding(nn.Module):
    def __init__(self, num_steps: int, width: int):
        super().__init__()
        self.num_steps = num_steps
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: Tensor) -> Tensor:
        first = self.mlp[0]
        return self.mlp(timestep_embedding(t, self.num_steps, first.in_features).to(first.weight.dtype))


class TimeConditionedHead(nn.Module):
    """Per-position output head: LayerNorm, FiLM by the time embedding, MLP to `out` logits."""

    def __init__(self, width: int, out: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.film = nn.Linear(width, 2 * width)
        self.hidden = nn.Linear(width, width)
        self.out = nn.Linear(width, out)

    def forward(self, h: Tensor, temb: Tensor) -> Tensor:
        # h: (..., D, W) features; temb: (..., W) broadcast over positions
        scale, shift = self.film(F.silu(temb)).unsqueeze(-2).chunk(2, dim=-1)
        h = self.norm(h) * (1 + scale) + shift
        return self.out(F.silu(self.hidden(F.silu(h))))


def distance_bias(heads: int, seq_len: int) -> Tensor:
    """(heads, D, D) attention bias -slope_h * |i - j| (bidirectional ALiBi), slopes 1/2 ... 1/2^heads.

    Without it the attention starts uniform over all positions and a small transformer sat at the
    unigram entropy on mini-text8 for over 1500 steps: nothing told it that neighbours matter.
    """
    slopes = torch.tensor([2.0 ** -(h + 1) for h in range(heads)])
    distance = (torch.arange(seq_len)[:, None] - torch.arange(seq_len)[None, :]).abs().float()
    return -slopes[:, None, None] * distance


class Block(nn.Module):
    """Pre-norm bidirectional self-attention block with a distance bias. A time-conditioned block
    shifts and scales both norms by the time embedding (adaLN, zero-initialised so it starts
    time-independent); the others have no modulation parameters (DDP needs every one used)."""

    def __init__(self, width: int, heads: int, seq_len: int, time_conditioned: bool):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.modulation = nn.Linear(width, 4 * width) if time_conditioned else None
        if self.modulation is not None:
            nn.init.zeros_(self.modulation.weight)
            nn.init.zeros_(self.modulation.bias)
        self.register_buffer("attn_bias", distance_bias(heads, seq_len), persistent=False)

    def forward(self, h: Tensor, temb: Tensor | None = None) -> Tensor:
        B, D, W = h.shape
        if (temb is None) != (self.modulation is None):
            raise ValueError("a time-conditioned block needs temb; the others take none")
        a = self.norm1(h)
        if temb is not None:  # temb (B, W) -> four (B, 1, W) modulations
            scale1, shift1, scale2, shift2 = self.modulation(F.silu(temb)).unsqueeze(1).chunk(4, dim=-1)
            a = a * (1 + scale1) + shift1
        q, k, v = self.qkv(a).view(B, D, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=self.attn_bias.to(q.dtype))
        h = h + self.proj(attn.transpose(1, 2).reshape(B, D, W))
        b = self.norm2(h)
        if temb is not None:
            b = b * (1 + scale2) + shift2
        return h + self.mlp(b)


class TokenNetwork(nn.Module):
    """Inputs over D positions (vocabulary `num_inputs`) + step t -> (D, num_outputs) logits."""

    def __init__(self, cfg: NetworkConfig, *, seq_len: int, num_inputs: int, num_outputs: int,
                 num_steps: int, time_in_trunk: bool):
        super().__init__()
        self.arch, self.seq_len, self.num_inputs, self.num_outputs = cfg.arch, seq_len, num_inputs, num_outputs
        self.time_in_trunk = time_in_trunk
        W = cfg.width
        self.time = TimeEmbedding(num_steps, W)
        if cfg.arch == "transformer":
            self.embed = nn.Parameter(torch.randn(num_inputs, W) * 0.02)
            self.pos = nn.Parameter(torch.randn(seq_len, W) * 0.02)
            self.blocks = nn.ModuleList(Block(W, cfg.heads, seq_len, time_in_trunk) for _ in range(cfg.depth))
            self.head = TimeConditionedHead(W, num_outputs)
        else:  # MLP over all positions at once, for tiny D
            self.embed = nn.Parameter(torch.randn(seq_len * num_inputs, W) * (1.0 / math.sqrt(seq_len)))
            self.embed_bias = nn.Parameter(torch.zeros(W))
            self.layers = nn.ModuleList(nn.Linear(W, W) for _ in range(cfg.depth - 1))
            self.head = TimeConditionedHead(W, seq_len * num_outputs)

    @property
    def output_layer(self) -> nn.Linear:
        return self.head.out

    def _embed(self, inputs: Tensor) -> Tensor:
        """Hard tokens (B, D) or soft one-hot (B, D, num_inputs) -> transformer (B, D, W) / MLP (B, W)."""
        if inputs.dtype in (torch.int64, torch.int32):
            if self.arch == "transformer":
                return self.embed[inputs] + self.pos
            offsets = torch.arange(self.seq_len, device=inputs.device) * self.num_inputs
            return self.embed[inputs + offsets].sum(dim=1) + self.embed_bias
        soft = inputs.to(self.embed.dtype)
        if self.arch == "transformer":
            return soft @ self.embed + self.pos
        return soft.flatten(1) @ self.embed + self.embed_bias

    def _trunk(self, h: Tensor, temb: Tensor | None = None) -> Tensor:
        if self.arch == "transformer":
            for block in self.blocks:
                h = block(h, temb)
            return h
        h = h if temb is None else h + temb
        for layer in self.layers:
            h = h + layer(F.silu(h))
        return h.unsqueeze(1)  # (B, 1, W): one "position" that the head expands to D x out

    def forward(self, inputs: Tensor, t: Tensor) -> Tensor:
        multi = t.dim() == 2
        if self.time_in_trunk:
            if multi:
                raise ValueError("a network with time in its trunk takes one step per input (t of shape (B,))")
            # The transformer takes time through adaLN in every block: added to the embedding, it
            # swamped the small token embedding after the first LayerNorm (unigram-level text).
            temb = self.time(t)
            out = self.head(self._trunk(self._embed(inputs), temb), temb)
        else:
            h = self._trunk(self._embed(inputs))  # once per input, shared by every queried step
            temb = self.time(t if multi else t[:, None])  # (B, n, W)
            out = self.head(h.unsqueeze(1), temb)  # (B, n, D or 1, out)
            out = out if multi else out[:, 0]
        out = out.reshape(*out.shape[:-2], self.seq_len, self.num_outputs)
        return out.to(torch.promote_types(out.dtype, torch.float32))  # bf16 autocast -> fp32 logits

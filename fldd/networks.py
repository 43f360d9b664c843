"""Time-conditioned networks over token positions.

Both networks map inputs over D positions plus integer steps t to D x out logits:
- the reverse network v_theta(z_t, t): inputs are latent states (hard tokens, or soft one-hot
  vectors during the Concrete warm-up);
- the learned forward network f_phi(x, t): inputs are data tokens; its trunk sees x only, so
  u(x,t) and u(x,s) come from one trunk pass, and time enters at the head.

The rule that keeps a learned forward alive (docs/method.md, "How fast a step moves u"): time
enters every network through a table, one learned vector per step, never through a sinusoid and an
MLP of its own. A path that does not depend on x gets the same gradient from every example, Adam
moves each of its parameters by about the learning rate per step, and in a path of several layers
those moves compound: the old sinusoid -> 2-layer MLP -> FiLM path moved log u(x,1) by 1-2 nats
per step on toy2d, 99% of it the same for every x, and the forward's softmax was dead (u one-hot,
gradient exactly 0) by step 60. The reverse MLP takes time as one more input of its first layer;
the reverse transformer's blocks are scaled and shifted by per-step tables (zero at init).

`forward(inputs, t)` accepts t of shape (B,) -> (B, D, out), or (B, n) -> (B, n, D, out).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fldd.config import NetworkConfig


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
    scales and shifts both norms by a per-step table (adaLN with the table as its only parameter,
    zero-initialised so the block starts time-independent); the others have no modulation
    parameters (DDP needs every one used)."""

    def __init__(self, width: int, heads: int, seq_len: int, num_steps: int | None):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.modulation = nn.Embedding(num_steps + 1, 4 * width) if num_steps is not None else None
        if self.modulation is not None:
            nn.init.zeros_(self.modulation.weight)
        self.register_buffer("attn_bias", distance_bias(heads, seq_len), persistent=False)

    def forward(self, h: Tensor, t: Tensor | None = None) -> Tensor:
        B, D, W = h.shape
        if (t is None) != (self.modulation is None):
            raise ValueError("a time-conditioned block needs t; the others take none")
        a = self.norm1(h)
        if t is not None:  # t (B,) -> four (B, 1, W) modulations
            scale1, shift1, scale2, shift2 = self.modulation(t).unsqueeze(1).chunk(4, dim=-1)
            a = a * (1 + scale1) + shift1
        q, k, v = self.qkv(a).view(B, D, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=self.attn_bias.to(q.dtype))
        h = h + self.proj(attn.transpose(1, 2).reshape(B, D, W))
        b = self.norm2(h)
        if t is not None:
            b = b * (1 + scale2) + shift2
        return h + self.mlp(b)


class TimeConditionedHead(nn.Module):
    """The learned forward MLP's output head: LayerNorm'd x-features, scaled and shifted per step
    (FiLM from the step's table vector), then an MLP to the logits of every position and step."""

    def __init__(self, num_steps: int, width: int, out: int):
        super().__init__()
        self.time = nn.Embedding(num_steps + 1, width)
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.film = nn.Linear(width, 2 * width)
        self.hidden = nn.Linear(width, width)
        self.out = nn.Linear(width, out)

    def forward(self, h: Tensor, t: Tensor) -> Tensor:
        # h: (B, W) features of x; t: (B, n) -> (B, n, out)
        scale, shift = self.film(F.silu(self.time(t))).chunk(2, dim=-1)
        h = self.norm(h).unsqueeze(1) * (1 + scale) + shift
        return self.out(F.silu(self.hidden(F.silu(h))))


class TokenNetwork(nn.Module):
    """Inputs over D positions (vocabulary `num_inputs`) + step t -> (D, num_outputs) logits.

    mlp: one vector for all positions, for tiny D (toy2d, binary digits, small tables). The
    reverse (`time_in_trunk`):
        h = silu(E z + b + time[t]);  h = silu(W_l h) + h  (depth times);  logits = W_out h
    where E z is a linear layer on the one-hot inputs (a sum of per-(position, token) rows) and
    time[t] a learned vector per step. The forward MLP (not `time_in_trunk`) runs a trunk on x once
    and a head that scales and shifts its normalised features per step (FiLM from time[t]).
    transformer: per-position features. With `time_in_trunk` (the reverse) every block is
    modulated by per-step tables; otherwise (the learned forward) the trunk sees x only, runs once
    for every queried t, and time[t] is added to the normalised features at the head.
    """

    def __init__(self, cfg: NetworkConfig, *, seq_len: int, num_inputs: int, num_outputs: int,
                 num_steps: int, time_in_trunk: bool):
        super().__init__()
        self.arch, self.seq_len, self.num_inputs, self.num_outputs = cfg.arch, seq_len, num_inputs, num_outputs
        self.time_in_trunk = time_in_trunk
        W = cfg.width
        if cfg.arch == "transformer":
            self.embed = nn.Parameter(torch.randn(num_inputs, W) * 0.02)
            self.pos = nn.Parameter(torch.randn(seq_len, W) * 0.02)
            self.blocks = nn.ModuleList(Block(W, cfg.heads, seq_len, num_steps if time_in_trunk else None)
                                        for _ in range(cfg.depth))
            self.norm = nn.LayerNorm(W, elementwise_affine=False)
            # the forward's time vector, on the scale of the normalised features it is added to
            self.time = None if time_in_trunk else nn.Embedding(num_steps + 1, W)
            self.hidden = nn.Linear(W, W)
            self.out = nn.Linear(W, num_outputs)
        elif time_in_trunk:  # the reverse MLP: time is one more input of the first layer
            # a Linear on the flattened one-hot input, kept as its weight table (soft inputs: a matmul)
            fan_in = seq_len * num_inputs
            bound = 1.0 / math.sqrt(fan_in)
            self.embed = nn.Parameter(torch.empty(fan_in, W).uniform_(-bound, bound))
            self.embed_bias = nn.Parameter(torch.empty(W).uniform_(-bound, bound))
            self.time = nn.Embedding(num_steps + 1, W)  # N(0, 1): at init the time vector dominates
            self.layers = nn.ModuleList(nn.Linear(W, W) for _ in range(cfg.depth))
            self.out = nn.Linear(W, seq_len * num_outputs)
        else:  # the forward MLP: a trunk on x alone, run once for every queried step
            self.embed = nn.Parameter(torch.randn(seq_len * num_inputs, W) * (1.0 / math.sqrt(seq_len)))
            self.embed_bias = nn.Parameter(torch.zeros(W))
            self.layers = nn.ModuleList(nn.Linear(W, W) for _ in range(cfg.depth - 1))
            self.head = TimeConditionedHead(num_steps, W, seq_len * num_outputs)

    @property
    def output_layer(self) -> nn.Linear:
        return self.head.out if hasattr(self, "head") else self.out

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

    def forward(self, inputs: Tensor, t: Tensor) -> Tensor:
        multi = t.dim() == 2
        tt = t if multi else t[:, None]  # (B, n)
        h = self._embed(inputs)
        if self.arch == "transformer":
            if self.time_in_trunk:
                if multi:
                    raise ValueError("a network with time in its trunk takes one step per input (t of shape (B,))")
                for block in self.blocks:
                    h = block(h, t)
                h = self.norm(h).unsqueeze(1)  # (B, 1, D, W)
            else:
                for block in self.blocks:
                    h = block(h)
                h = self.norm(h).unsqueeze(1) + self.time(tt).unsqueeze(2)  # (B, n, D, W)
            out = self.out(F.silu(self.hidden(F.silu(h))))
        elif self.time_in_trunk:
            h = F.silu(h.unsqueeze(1) + self.time(tt))  # (B, n, W)
            for layer in self.layers:
                h = F.silu(layer(h)) + h
            out = self.out(h)
        else:
            for layer in self.layers:
                h = h + layer(F.silu(h))
            out = self.head(h, tt)  # (B, n, D * out)
        out = out.reshape(*out.shape[:2], self.seq_len, self.num_outputs)
        out = out if multi else out[:, 0]
        return out.to(torch.promote_types(out.dtype, torch.float32))  # bf16 autocast -> fp32 logits

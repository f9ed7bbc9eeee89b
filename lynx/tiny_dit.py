"""A small FLUX-structured MMDiT: the embedded default for the demo, tests and quality work.

Module names follow ComfyUI's comfy.ldm.flux.model.Flux (double_blocks.*.img_attn.qkv,
single_blocks.*.linear1, ...), so the FLUX layer policy applies to it unchanged. RoPE and
guidance embedding are left out; everything else (modulation, QK-norm, parallel single blocks)
is as in FLUX.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class TinyDiTConfig:
    in_channels: int = 64        # 16 latent channels x 2x2 patches, as FLUX
    context_dim: int = 128
    hidden: int = 256
    heads: int = 4
    mlp_ratio: float = 4.0
    double_blocks: int = 2
    single_blocks: int = 4


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * 1000.0 * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden)
        self.out_layer = nn.Linear(hidden, hidden)

    def forward(self, x):
        return self.out_layer(F.silu(self.in_layer(x)))


class QKNorm(nn.Module):
    def __init__(self, head_dim: int):
        super().__init__()
        self.query_norm = nn.RMSNorm(head_dim)
        self.key_norm = nn.RMSNorm(head_dim)

    def forward(self, q, k):
        return self.query_norm(q), self.key_norm(k)


class Modulation(nn.Module):
    def __init__(self, hidden: int, chunks: int):
        super().__init__()
        self.chunks = chunks
        self.lin = nn.Linear(hidden, chunks * hidden)

    def forward(self, vec):
        return self.lin(F.silu(vec))[:, None, :].chunk(self.chunks, dim=-1)


class SelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.norm = QKNorm(hidden // heads)
        self.proj = nn.Linear(hidden, hidden)


def split_heads(qkv: torch.Tensor, heads: int):
    b, length, _ = qkv.shape
    q, k, v = qkv.view(b, length, 3, heads, -1).permute(2, 0, 3, 1, 4)
    return q, k, v


def attention(q, k, v):
    out = F.scaled_dot_product_attention(q, k, v)
    b, h, length, d = out.shape
    return out.transpose(1, 2).reshape(b, length, h * d)


def mlp(hidden: int, ratio: float) -> nn.Sequential:
    inner = int(hidden * ratio)
    return nn.Sequential(nn.Linear(hidden, inner), nn.GELU(approximate="tanh"), nn.Linear(inner, hidden))


class DoubleStreamBlock(nn.Module):
    def __init__(self, hidden: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads = heads
        for stream in ("img", "txt"):
            setattr(self, f"{stream}_mod", Modulation(hidden, 6))
            setattr(self, f"{stream}_norm1", nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6))
            setattr(self, f"{stream}_attn", SelfAttention(hidden, heads))
            setattr(self, f"{stream}_norm2", nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6))
            setattr(self, f"{stream}_mlp", mlp(hidden, mlp_ratio))

    def forward(self, img, txt, vec):
        img_mod = self.img_mod(vec)
        txt_mod = self.txt_mod(vec)
        qkvs = []
        for x, mod, norm, attn in ((txt, txt_mod, self.txt_norm1, self.txt_attn),
                                   (img, img_mod, self.img_norm1, self.img_attn)):
            shift, scale = mod[0], mod[1]
            q, k, v = split_heads(attn.qkv((1 + scale) * norm(x) + shift), self.heads)
            q, k = attn.norm(q, k)
            qkvs.append((q, k, v))
        q, k, v = (torch.cat([t, i], dim=2) for t, i in zip(*qkvs))
        out = attention(q, k, v)
        txt_out, img_out = out[:, :txt.shape[1]], out[:, txt.shape[1]:]
        results = []
        for x, a, mod, attn, norm2, ff in ((img, img_out, img_mod, self.img_attn, self.img_norm2, self.img_mlp),
                                            (txt, txt_out, txt_mod, self.txt_attn, self.txt_norm2, self.txt_mlp)):
            x = x + mod[2] * attn.proj(a)
            x = x + mod[5] * ff((1 + mod[4]) * norm2(x) + mod[3])
            results.append(x)
        return results[0], results[1]


class SingleStreamBlock(nn.Module):
    def __init__(self, hidden: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads = heads
        self.hidden = hidden
        self.mlp_hidden = int(hidden * mlp_ratio)
        self.linear1 = nn.Linear(hidden, 3 * hidden + self.mlp_hidden)
        self.linear2 = nn.Linear(hidden + self.mlp_hidden, hidden)
        self.norm = QKNorm(hidden // heads)
        self.pre_norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.modulation = Modulation(hidden, 3)

    def forward(self, x, vec):
        shift, scale, gate = self.modulation(vec)
        qkv, mlp_in = torch.split(self.linear1((1 + scale) * self.pre_norm(x) + shift),
                                  [3 * self.hidden, self.mlp_hidden], dim=-1)
        q, k, v = split_heads(qkv, self.heads)
        q, k = self.norm(q, k)
        out = attention(q, k, v)
        return x + gate * self.linear2(torch.cat([out, F.gelu(mlp_in, approximate="tanh")], dim=-1))


class LastLayer(nn.Module):
    def __init__(self, hidden: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x, vec):
        shift, scale = self.adaLN_modulation(vec)[:, None, :].chunk(2, dim=-1)
        return self.linear((1 + scale) * self.norm_final(x) + shift)


class TinyFluxDiT(nn.Module):
    def __init__(self, config: TinyDiTConfig = TinyDiTConfig()):
        super().__init__()
        self.config = config
        c = config
        self.img_in = nn.Linear(c.in_channels, c.hidden)
        self.txt_in = nn.Linear(c.context_dim, c.hidden)
        self.time_in = MLPEmbedder(256, c.hidden)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(c.hidden, c.heads, c.mlp_ratio)
                                           for _ in range(c.double_blocks))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(c.hidden, c.heads, c.mlp_ratio)
                                           for _ in range(c.single_blocks))
        self.final_layer = LastLayer(c.hidden, c.in_channels)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """img: (B, L, in_channels) patch tokens, txt: (B, T, context_dim), timesteps: (B,) in [0, 1]."""
        vec = self.time_in(timestep_embedding(timesteps, 256).to(img.dtype))
        img, txt = self.img_in(img), self.txt_in(txt)
        for block in self.double_blocks:
            img, txt = block(img, txt, vec)
        x = torch.cat([txt, img], dim=1)
        for block in self.single_blocks:
            x = block(x, vec)
        return self.final_layer(x[:, txt.shape[1]:], vec)


def random_inputs(config: TinyDiTConfig, batch: int, image_tokens: int, text_tokens: int,
                  generator: torch.Generator, device="cpu", dtype=torch.float32):
    img = torch.randn(batch, image_tokens, config.in_channels, generator=generator).to(device, dtype)
    txt = torch.randn(batch, text_tokens, config.context_dim, generator=generator).to(device, dtype)
    t = torch.rand(batch, generator=generator).to(device)
    return img, txt, t

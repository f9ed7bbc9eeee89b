"""Train the small FLUX-architecture DiT that bench/quality.py measures Lynx on.

Data: scikit-learn's handwritten digits (1797 images of 8x8, shipped with the package),
upsampled to 16x16, as 64 tokens of 2x2 patches. Class-conditioned through text tokens: a
learned embedding per class gives the txt input (4 tokens). Rectified-flow objective
(x_t = (1 - t) x0 + t noise, predict noise - x0). TinyFluxDiT has no RoPE, so each image token
carries fixed 2D sinusoidal position channels next to its 4 pixels; only the pixel channels of
the output are used.

    python bench/train_tiny_dit.py            # 6 minutes on 2 CPU cores (~1100 steps), writes bench/assets/
"""
import argparse
import json
import math
import pathlib
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from standalone import load_pack  # noqa: E402

load_pack()
from rt_lynx_pack.lynx.tiny_dit import TinyDiTConfig, TinyFluxDiT  # noqa: E402

CHECKPOINT = ROOT / "bench" / "assets" / "tiny_dit_digits.safetensors"
IMAGE_SIZE, PATCH, PIXEL_CHANNELS, POSITION_CHANNELS = 16, 2, 4, 12
TEXT_TOKENS, CLASSES = 4, 10
MODEL_CONFIG = TinyDiTConfig(in_channels=PIXEL_CHANNELS + POSITION_CHANNELS, context_dim=64, hidden=128,
                             heads=4, mlp_ratio=4.0, double_blocks=2, single_blocks=4)


def digits_images() -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 1, 16, 16) in [-1, 1] and (N,) labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    images = F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return images * 2 - 1, torch.tensor(digits.target)


def to_tokens(images: torch.Tensor) -> torch.Tensor:
    b = images.shape[0]
    side = IMAGE_SIZE // PATCH
    return images.reshape(b, side, PATCH, side, PATCH).permute(0, 1, 3, 2, 4).reshape(b, side * side, PATCH * PATCH)


def from_tokens(tokens: torch.Tensor) -> torch.Tensor:
    b = tokens.shape[0]
    side = IMAGE_SIZE // PATCH
    return tokens.reshape(b, side, side, PATCH, PATCH).permute(0, 1, 3, 2, 4).reshape(b, 1, IMAGE_SIZE, IMAGE_SIZE)


def position_channels() -> torch.Tensor:
    side = IMAGE_SIZE // PATCH
    ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    features = []
    for coordinate in (ys.flatten(), xs.flatten()):
        for k in range(POSITION_CHANNELS // 4):
            angle = coordinate.float() / side * math.pi * (2 ** k)
            features += [torch.sin(angle), torch.cos(angle)]
    return torch.stack(features, dim=-1)   # (tokens, POSITION_CHANNELS)


class DigitsFlow(nn.Module):
    """TinyFluxDiT plus its class-to-text-token embedding; predicts the flow velocity."""

    def __init__(self, config: TinyDiTConfig = MODEL_CONFIG):
        super().__init__()
        self.dit = TinyFluxDiT(config)
        self.class_text = nn.Embedding(CLASSES, TEXT_TOKENS * config.context_dim)
        self.register_buffer("positions", position_channels(), persistent=False)

    def text(self, labels: torch.Tensor) -> torch.Tensor:
        return self.class_text(labels).view(labels.shape[0], TEXT_TOKENS, -1)

    def forward(self, pixels: torch.Tensor, labels: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        img = torch.cat([pixels, self.positions.expand(pixels.shape[0], -1, -1)], dim=-1)
        return self.dit(img, self.text(labels), t)[..., :PIXEL_CHANNELS]


def euler_sample(model: nn.Module, labels: torch.Tensor, noise: torch.Tensor, steps: int = 20,
                 on_step=None) -> torch.Tensor:
    """Flow-matching Euler from t = 1 (noise) to t = 0; returns images (B, 1, 16, 16)."""
    x = noise
    times = torch.linspace(1.0, 0.0, steps + 1)
    with torch.no_grad():
        for i in range(steps):
            t = torch.full((x.shape[0],), float(times[i]))
            if on_step is not None:
                on_step(x, labels, t)
            x = x + (times[i + 1] - times[i]) * model(x, labels, t)
    return from_tokens(x).clamp(-1, 1)


def load_trained(path: pathlib.Path = CHECKPOINT) -> DigitsFlow:
    from safetensors.torch import load_file

    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run python bench/train_tiny_dit.py to train it (6 min)")
    model = DigitsFlow()
    model.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    return model.eval()


def train(seconds: float, batch: int, lr: float, seed: int) -> tuple[DigitsFlow, dict]:
    torch.set_flush_denormal(True)   # denormal floats slowed CPU training tenfold mid-run
    torch.manual_seed(seed)
    images, labels = digits_images()
    tokens = to_tokens(images)
    model = DigitsFlow()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    start, step, running = time.time(), 0, None
    while time.time() - start < seconds:
        index = torch.randint(0, tokens.shape[0], (batch,))
        x0, y = tokens[index], labels[index]
        t = torch.sigmoid(torch.randn(batch))   # logit-normal: more weight on mid noise levels
        noise = torch.randn_like(x0)
        x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
        loss = F.mse_loss(model(x_t, y, t), noise - x0)
        warmup = min(1.0, (step + 1) / 100)
        for group in optimizer.param_groups:
            group["lr"] = lr * warmup
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        step += 1
        if step % 100 == 0:
            print(f"step {step}  loss {running:.4f}  {time.time() - start:.0f} s", flush=True)
    info = {"steps": step, "seconds": round(time.time() - start, 1), "final_loss": round(running, 4),
            "batch": batch, "lr": lr, "seed": seed, "threads": torch.get_num_threads()}
    return model.eval(), info


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=360)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=pathlib.Path, default=CHECKPOINT)
    args = parser.parse_args()
    from safetensors.torch import save_file

    model, info = train(args.seconds, args.batch, args.lr, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # fp16 keeps the checkpoint small enough for the repository; the benchmark computes in fp32.
    save_file({k: v.half().contiguous() for k, v in model.state_dict().items()}, str(args.out),
              metadata={"training": json.dumps(info)})
    print(json.dumps(info))


if __name__ == "__main__":
    main()

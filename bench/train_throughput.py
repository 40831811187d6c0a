"""Images/s of the ClientApp's training message against a plain PyTorch loop.

Three contenders take the same number of optimizer steps with the same model size and
batch on the same real images, interleaved in one process so machine noise hits them alike:

* plain: a textbook DDPM step written without any fedapp code;
* train_local: fedapp's training function alone;
* clientapp: the real ClientApp ``train`` handler, called as a SuperNode would call it
  (config, data share, model build, arrays in, training, arrays out);
* with ``--dp-sgd``, train_local with DP-SGD (Opacus: per-image gradients, clip, noise).

    python -m bench.train_throughput --dim 16 --batch 64 --steps 60 --repeats 3
    python -m bench.train_throughput --dim 16 --batch 16 --steps 60 --repeats 3 --dp-sgd
    python -m bench.train_throughput --device cuda --dim 28 --batch 128 --steps 300
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from torch.nn import functional as F

from bench.clientapp_call import ClientAppCaller, bench_config
from fedapp.config import DataConfig
from fedapp.data.sources import load_split
from fedapp.model.diffusion import Diffusion
from fedapp.model.unet import UNet
from fedapp.privacy.dpsgd import SampleLevelDP
from fedapp.train.loop import train_local
from fedapp.train.optim import Recipe


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plain_loop(model: UNet, images: torch.Tensor, batch: int, steps: int, lr: float, device: torch.device) -> float:
    """The reference: images already on the device, no helper, no per-step host sync."""
    betas = torch.linspace(1e-4, 0.02, 1000, device=device)
    abar = torch.cumprod(1 - betas, 0)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(0, len(images), (batch,), device=device)
        x0 = images[idx].float() / 127.5 - 1
        t = torch.randint(0, 1000, (batch,), device=device)
        eps = torch.randn_like(x0)
        a = abar[t].view(-1, 1, 1, 1)
        loss = F.smooth_l1_loss(model(a.sqrt() * x0 + (1 - a).sqrt() * eps, t), eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    _sync(device)
    return steps * batch / (time.perf_counter() - start)


def local_loop(model: UNet, images: torch.Tensor, batch: int, steps: int, lr: float, device: torch.device) -> float:
    result = train_local(model, Diffusion(), images[: steps * batch], epochs=1, batch_size=batch, recipe=Recipe(lr), seed=0,
                         device=device, max_steps=steps)
    return result.images_per_s


def dp_sgd_loop(model: UNet, images: torch.Tensor, batch: int, steps: int, lr: float, device: torch.device) -> float:
    """train_local with DP-SGD at σ = 1 and a per-image clip of 1 (Poisson batches of ``batch`` on average)."""
    part = images[: steps * batch]
    dp = SampleLevelDP(clip=1.0, noise_multiplier=1.0, sample_rate=batch / len(part), expected_batch=batch)
    result = train_local(model, Diffusion(), part, epochs=1, batch_size=batch, recipe=Recipe(lr), seed=0,
                         device=device, max_steps=steps, dp=dp)
    return result.images_per_s


def clientapp_loop(caller: ClientAppCaller, batch: int, steps: int, device: torch.device) -> float:
    """Wall time of the whole handler call, not only its training loop."""
    _sync(device)
    start = time.perf_counter()
    caller.train()
    _sync(device)
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dp-sgd", action="store_true", help="also time train_local with DP-SGD")
    args = parser.parse_args()
    device = torch.device(args.device)
    images = load_split(DataConfig(), "train").images
    torch.manual_seed(0)
    model = UNet(args.dim, (1, 2, 4), 1).to(device)
    caller = ClientAppCaller(bench_config(args.dim, args.batch, args.steps, args.device))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    print(f"device: {name}, {torch.get_num_threads()} CPU threads, torch {torch.__version__}; "
          f"UNet dim={args.dim} ({sum(p.numel() for p in model.parameters()):,} params), "
          f"batch {args.batch}, {args.steps} steps x {args.repeats} repeats")
    on_device = images.to(device)
    plain_loop(model, on_device, args.batch, 3, 1e-4, device)  # warm-up
    caller.train()  # warm-up: the data share is decoded and cached once per process
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rates: dict[str, list[float]] = {"plain": [], "train_local": [], "clientapp": []}
    if args.dp_sgd:
        rates["dp-sgd"] = []
    for _ in range(args.repeats):
        rates["plain"].append(plain_loop(model, on_device, args.batch, args.steps, 1e-4, device))
        rates["train_local"].append(local_loop(model, images, args.batch, args.steps, 1e-4, device))
        rates["clientapp"].append(clientapp_loop(caller, args.batch, args.steps, device))
        if args.dp_sgd:
            rates["dp-sgd"].append(dp_sgd_loop(model, images, args.batch, args.steps, 1e-4, device))
    best = {k: max(v) for k, v in rates.items()}
    for key, values in rates.items():
        print(f"{key:>12}: best {best[key]:8.1f} img/s   all {', '.join(f'{v:.1f}' for v in values)}")
    for key in ("train_local", "clientapp"):
        print(f"ratio {key}/plain (best of each): {best[key] / best['plain']:.3f}")
    if args.dp_sgd:
        print(f"ratio dp-sgd/train_local (best of each): {best['dp-sgd'] / best['train_local']:.3f}")
    if device.type == "cuda":
        print(f"peak GPU memory in this process: allocated {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB, "
              f"reserved {torch.cuda.max_memory_reserved(device) / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()

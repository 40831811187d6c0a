"""Measures what a CollaFuse server rebuilds: with the target sent in each transport dtype, and in a
variant that withholds it (the client keeps ε, the server gets dL/dε̂).

Usage: python -m scripts.collafuse_gradient_leak RUN_DIR [--client 0] [--n 256]
RUN_DIR is a finished CollaFuse run; its server model plays the server, and one client's own
training images play x0, noised at the server's timesteps [t_c, T). Prints the similarity to x0
of what the server rebuilds in each case.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

from fedapp.data.pixels import to_model_range
from fedapp.data.share import local_data
from fedapp.eval.disclosure import audit_upload, similarity
from fedapp.model.build import build_diffusion
from fedapp.model.diffusion import Diffusion
from fedapp.protocol.records import FLOAT_TRANSPORTS, decode_array, encode_tensor
from fedapp.runs.checkpoint import load_checkpoint


def target_from_loss_gradient(prediction: torch.Tensor, grad: torch.Tensor, loss: str) -> torch.Tensor:
    """The ε a server recovers from dL/dε̂ when the client keeps ε and returns only the loss gradient.

    Both losses are means over all n elements. MSE: dL/dε̂ = 2(ε̂ - ε)/n, so ε is exact. Huber
    (smooth-L1, β = 1): dL/dε̂ = clamp(ε̂ - ε, -1, 1)/n, exact wherever |ε̂ - ε| < 1 and off by the
    excess elsewhere. Withholding the target therefore withholds little.
    """
    n = prediction.numel()
    if loss == "mse":
        return prediction - grad * n / 2
    if loss == "huber":
        return prediction - grad * n
    raise ValueError(f"unknown loss {loss!r}; use 'huber' or 'mse'")


def gradient_variant_audit(model: nn.Module, diffusion: Diffusion, x0: torch.Tensor, t_range: tuple[int, int], *,
                           batch_size: int, seed: int = 0) -> dict[str, float]:
    """The three reconstructions of x0 for a variant where the client keeps ε and returns dL/dε̂.

    ``solve`` uses ε itself (today's protocol), ``gradient`` the ε recovered from the gradient,
    ``denoise`` the model's own ε̂ (what the server can do with x_t alone).
    """
    gen = torch.Generator().manual_seed(seed)
    rebuilt: dict[str, list[torch.Tensor]] = {"solve": [], "gradient": [], "denoise": []}
    exact = total = 0
    model.eval()
    for first in range(0, len(x0), batch_size):
        batch = x0[first : first + batch_size]
        x_t, t, eps = diffusion.noised(batch, t_range, gen)
        prediction = model(x_t, t).detach().requires_grad_(True)
        diffusion.criterion(prediction, eps).backward()
        assert prediction.grad is not None
        guess = target_from_loss_gradient(prediction.detach(), prediction.grad, diffusion.loss_kind)
        exact += int(((guess - eps).abs() < 1e-4).sum())
        total += eps.numel()
        for name, e in (("solve", eps), ("gradient", guess), ("denoise", prediction.detach())):
            rebuilt[name].append(diffusion.x0_from_eps(x_t, t, e).clamp(-1, 1))
    out = {"gradient-exact-fraction": exact / total}
    for name, parts in rebuilt.items():
        out.update(similarity(torch.cat(parts), x0, name))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--client", type=int, default=0, help="partition id whose images play x0")
    parser.add_argument("--n", type=int, default=256)
    args = parser.parse_args()
    torch.set_grad_enabled(True)
    model, cfg, payload = load_checkpoint(args.run / "final.pt")
    num = int(payload["extra"]["metrics"][-1]["train"].get("num-partitions", cfg.data.num_partitions))
    x0 = to_model_range(local_data(cfg.data, cfg.seed, args.client, num).train.images[: args.n])
    diffusion = build_diffusion(cfg)
    t_cut = cfg.collafuse.cut(cfg.diffusion.timesteps)
    result = gradient_variant_audit(model, diffusion, x0, (t_cut, cfg.diffusion.timesteps),
                                    batch_size=cfg.train.batch_size, seed=cfg.seed)
    x_t, t, eps = diffusion.noised(x0, (t_cut, cfg.diffusion.timesteps), torch.Generator().manual_seed(cfg.seed))
    for dtype in FLOAT_TRANSPORTS:  # the solve on what arrives in each dtype
        sent = {k: decode_array(encode_tensor(v, dtype)) for k, v in (("x-t", x_t), ("target", eps))}  # type: ignore[arg-type]
        audit = audit_upload(diffusion, sent["x-t"], t, sent["target"], x0)
        result.update({f"{dtype}-{k.removeprefix('audit-')}": v for k, v in audit.items() if "solve" in k})
    print(json.dumps({"run": args.run.name, "t-c": t_cut, "loss": cfg.diffusion.loss, "n": len(x0), **result},
                     indent=1))


if __name__ == "__main__":
    main()

"""What a CollaFuse server learns about a client's images from what it receives.

Three measurements, all against the client's real x0, in the model's [-1, 1] range:
- what it *sees*: x_t itself;
- what it can *solve for*: x0 from x_t, t and the target ε it was sent (exact up to the wire's rounding);
- what its *own denoiser* rebuilds: x0 from x_t, t and its predicted ε.
The client computes them (only it has x0); the numbers never claim more than they measure.
"""

from __future__ import annotations

import torch
from torch import nn

from fedapp.model.diffusion import Diffusion

DATA_RANGE = 2.0  # images live in [-1, 1]


def ssim(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-image structural similarity (Gaussian window, torchmetrics' defaults).

    torchmetrics is imported here: it pulls in torchvision and scipy (2-3 s), which every ClientApp
    process of a deployment would otherwise pay on a training message that never scores SSIM.
    """
    from torchmetrics.functional.image import structural_similarity_index_measure

    if len(images) == 0:
        return torch.empty(0)
    side = min(images.shape[-2:])
    kernel = min(11, side - (1 - side % 2))  # an odd window no larger than the image
    return structural_similarity_index_measure(
        images.float(), reference.float(), data_range=DATA_RANGE, kernel_size=kernel, reduction="none"
    )


def similarity(images: torch.Tensor, reference: torch.Tensor, prefix: str) -> dict[str, float]:
    """Mean pixel MSE, mean SSIM and the 90th-percentile SSIM (the most revealing tail)."""
    if len(images) == 0:
        return {}
    mse = ((images.float() - reference.float()) ** 2).flatten(1).mean(1)
    scores = ssim(images, reference)
    return {
        f"{prefix}-mse": float(mse.mean()),
        f"{prefix}-ssim": float(scores.mean()),
        f"{prefix}-ssim-p90": float(torch.quantile(scores, 0.9)),
    }


def audit_upload(diffusion: Diffusion, x_t: torch.Tensor, t: torch.Tensor, target: torch.Tensor,
                 x0: torch.Tensor) -> dict[str, float]:
    """What the server sees (x_t) and what it solves for with the target, on exactly what was sent."""
    solved = diffusion.x0_from_eps(x_t.float(), t, target.float())
    return {**similarity(x_t, x0, "audit-xt"), **similarity(solved, x0, "audit-solve")}


@torch.no_grad()
def denoiser_reconstruction(model: nn.Module, diffusion: Diffusion, x_t: torch.Tensor, t: torch.Tensor,
                            batch_size: int = 256, device: torch.device | str = "cpu") -> torch.Tensor:
    """x0 from x_t and the model's own ε guess, clamped to the image range (clamping only helps it)."""
    was_training = model.training
    model.to(device).eval()
    out = []
    try:
        for first in range(0, len(x_t), batch_size):
            x = x_t[first : first + batch_size].to(device)
            steps = t[first : first + batch_size].to(device)
            out.append(diffusion.x0_from_eps(x, steps, model(x, steps)).clamp(-1, 1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else x_t.new_empty((0, *x_t.shape[1:]))

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
from torchmetrics.functional.image import structural_similarity_index_measure

from fedapp.model.diffusion import Diffusion

DATA_RANGE = 2.0  # images live in [-1, 1]


def ssim(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-image structural similarity (Gaussian window, torchmetrics' defaults)."""
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

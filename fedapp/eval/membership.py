"""A membership inference audit: does a model's denoising loss tell its training images from unseen ones?

The attack (a loss threshold, as Matsumoto et al. 2023 and Carlini et al. 2023 use on diffusion
models): every image is scored by its mean ε-loss over the same fixed (t, ε) draws, a lower loss
meaning "member". Members are a client's training images, non-members held-out test images the
federation never saw. ROC AUC 0.5 is a coin; TPR at 1 % FPR says how many members an attacker
names while accusing 1 in 100 outsiders. Fixed draws shared by every image leave only the image to
make the difference, so two models (with and without DP) are audited on identical terms.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from torchmetrics.functional.classification import binary_auroc, binary_roc

from fedapp.data.pixels import to_model_range
from fedapp.model.diffusion import Diffusion


@dataclass(frozen=True)
class MembershipResult:
    auc: float
    tpr_at_1pct_fpr: float
    members: int
    nonmembers: int

    def row(self) -> dict[str, float | int]:
        return {"auc": self.auc, "tpr@1%fpr": self.tpr_at_1pct_fpr, "members": self.members,
                "nonmembers": self.nonmembers}


@torch.no_grad()
def per_image_loss(model: nn.Module, diffusion: Diffusion, images: torch.Tensor, *, draws: int, seed: int,
                   device: torch.device, batch_size: int = 256, max_timestep: int = 0) -> torch.Tensor:
    """Each uint8 image's MSE between ε and ε̂ averaged over ``draws`` (t, ε) pairs, the same pairs for
    every image (seeded by ``seed``); t uniform on [0, ``max_timestep``) (0: the whole chain)."""
    if draws < 1 or len(images) == 0:
        raise ValueError(f"an audit needs draws >= 1 and images; got {draws} draws, {len(images)} images")
    hi = max_timestep or diffusion.timesteps
    gen = torch.Generator().manual_seed(seed)
    ts = torch.randint(0, hi, (draws,), generator=gen)
    noises = torch.randn((draws, *images.shape[1:]), generator=gen)
    was_training = model.training
    model.to(device).eval()
    total = torch.zeros(len(images), dtype=torch.float64)
    try:
        for t, noise in zip(ts.tolist(), noises, strict=True):
            for first in range(0, len(images), batch_size):
                x0 = to_model_range(images[first : first + batch_size]).to(device)
                eps = noise.to(device).expand_as(x0)
                step = torch.full((len(x0),), t, device=device, dtype=torch.long)
                x_t = diffusion.scheduler.add_noise(x0, eps, step)
                loss = F.mse_loss(model(x_t, step), eps, reduction="none").flatten(1).mean(1)
                total[first : first + len(x0)] += loss.double().cpu()
    finally:
        model.train(was_training)
    return (total / draws).float()


def loss_attack(member_loss: torch.Tensor, nonmember_loss: torch.Tensor) -> MembershipResult:
    """ROC AUC and TPR at 1 % FPR of calling the lower-loss images members."""
    if len(member_loss) == 0 or len(nonmember_loss) == 0:
        raise ValueError("an attack needs members and non-members")
    scores = -torch.cat([member_loss, nonmember_loss]).double()
    labels = torch.cat([torch.ones(len(member_loss)), torch.zeros(len(nonmember_loss))]).long()
    auc = float(binary_auroc(scores, labels))
    fpr, tpr, _ = binary_roc(scores, labels)
    return MembershipResult(auc=auc, tpr_at_1pct_fpr=float(tpr[fpr <= 0.01].max()),
                            members=len(member_loss), nonmembers=len(nonmember_loss))


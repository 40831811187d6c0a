"""The loss attack's validation: a model deliberately overfit on a few hundred images must give them away.

A centralized loop trains one UNet for many epochs on ``--images`` training images, and every
``--every`` steps the attack of ``fedapp.eval.membership`` scores those images (members) against as
many test images (non-members), at each ``--max-timestep``. The attack is valid where the AUC climbs
well above 0.5 as the model memorizes; a federated model trained one pass over thousands of images
should then sit near 0.5 (``fedapp audit RUN``).

    python -m bench.membership_overfit --images 200 --dim 16 --seconds 600 --out overfit.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from fedapp.config import DataConfig
from fedapp.data.sources import load_split
from fedapp.eval.membership import loss_attack, per_image_loss
from fedapp.model.diffusion import Diffusion
from fedapp.model.unet import build_unet
from fedapp.train.loop import pick_device, train_local
from fedapp.train.optim import Recipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seconds", type=float, default=600.0, help="training time, checks not counted")
    parser.add_argument("--every", type=int, default=500, help="optimizer steps between attacks")
    parser.add_argument("--draws", type=int, default=8)
    parser.add_argument("--max-timesteps", default="0,100", help="comma-separated; 0: the whole chain")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    device = pick_device(args.device)
    members = load_split(DataConfig(), "train").images[: args.images]
    outsiders = load_split(DataConfig(), "test").images[: args.images]
    torch.manual_seed(0)
    model = build_unet(args.dim, (1, 2, 4), 1, 28)
    diffusion = Diffusion(loss="mse")
    optimizer, trained, steps, chunk = None, 0.0, 0, 0
    while trained < args.seconds:
        result = train_local(model, diffusion, members, epochs=10**6, batch_size=args.batch,
                             recipe=Recipe(lr=args.lr), seed=chunk, device=device, max_steps=args.every,
                             optimizer=optimizer)
        optimizer, trained, steps, chunk = result.optimizer, trained + result.seconds, steps + result.steps, chunk + 1
        for max_t in (int(x) for x in args.max_timesteps.split(",")):
            kwargs = {"draws": args.draws, "seed": 0, "device": device, "max_timestep": max_t}
            attack = loss_attack(per_image_loss(model, diffusion, members, **kwargs),
                                 per_image_loss(model, diffusion, outsiders, **kwargs))
            row = {"images": args.images, "dim": args.dim, "steps": steps, "epochs": steps * args.batch / args.images,
                   "train_s": round(trained, 1), "train_loss": result.loss, "max_timestep": max_t,
                   **attack.row(), "device": str(device)}
            print(json.dumps(row), flush=True)
            if args.out is not None:
                with args.out.open("a") as f:
                    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()

"""``fedapp`` command line: jobs that run outside a Flower simulation."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedapp.builders import build_diffusion


def _sample(args: argparse.Namespace) -> int:
    from fedapp.checkpoint import load_checkpoint
    from fedapp.datasets import image_shape
    from fedapp.images import save_grid
    from fedapp.sampling import generate
    from fedapp.training import pick_device

    device = pick_device(args.device)
    model, cfg, payload = load_checkpoint(args.checkpoint, device=device)
    steps = args.steps if args.sampler == "ddim" else None
    samples = generate(
        model, build_diffusion(cfg), args.n, image_shape(cfg.data),
        kind=args.sampler, steps=steps, seed=args.seed, device=device, progress=True,
    )
    out = args.out or Path(args.checkpoint).with_name(
        f"{Path(args.checkpoint).stem}-{args.sampler}{steps or ''}-seed{args.seed}.png"
    )
    save_grid(samples, out)
    print(f"wrote {len(samples)} samples from round {payload['round']} to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedapp", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sample = sub.add_parser("sample", help="write a PNG grid of samples from a checkpoint")
    sample.add_argument("checkpoint", type=Path)
    sample.add_argument("--out", type=Path, default=None, help="PNG path (default: next to the checkpoint)")
    sample.add_argument("--n", type=int, default=64, help="number of images")
    sample.add_argument("--sampler", choices=["ddim", "ddpm"], default="ddim")
    sample.add_argument("--steps", type=int, default=50, help="DDIM steps (DDPM always runs the full chain)")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    sample.set_defaults(func=_sample)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (FileNotFoundError, ValueError) as err:
        print(f"fedapp {args.command}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

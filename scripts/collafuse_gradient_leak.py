"""Measures what a CollaFuse server rebuilds: with the target sent in each transport dtype, and in a
variant that withholds it (the client keeps ε, the server gets dL/dε̂).

Usage: python scripts/collafuse_gradient_leak.py RUN_DIR [--client 0] [--n 256]
RUN_DIR is a finished CollaFuse run; its server model plays the server, and one client's own
training images play x0, noised at the server's timesteps [t_c, T). Prints the similarity to x0
of what the server rebuilds in each case.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from fedapp.data.pixels import to_model_range
from fedapp.data.share import local_data
from fedapp.eval.disclosure import audit_upload, gradient_variant_audit
from fedapp.model.build import build_diffusion
from fedapp.protocol.records import TRANSPORT_DTYPES, decode_array, encode_tensor
from fedapp.runs.checkpoint import load_checkpoint


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
    for dtype in TRANSPORT_DTYPES:  # the solve on what arrives in each dtype
        sent = {k: decode_array(encode_tensor(v, dtype)) for k, v in (("x-t", x_t), ("target", eps))}  # type: ignore[arg-type]
        audit = audit_upload(diffusion, sent["x-t"], t, sent["target"], x0)
        result.update({f"{dtype}-{k.removeprefix('audit-')}": v for k, v in audit.items() if "solve" in k})
    print(json.dumps({"run": args.run.name, "t-c": t_cut, "loss": cfg.diffusion.loss, "n": len(x0), **result},
                     indent=1))


if __name__ == "__main__":
    main()

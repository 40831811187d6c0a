"""pytorch-fid's InceptionV3 with its FID weights, found without surprises.

The weights are looked up in a fixed order (a configured file, the torch hub cache, the
standard download). When none works the caller gets one line saying so, and no network
is ever built with random weights in their place.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from unittest import mock

import torch
from pytorch_fid import inception as pf_inception
from torch import nn

from fedapp.files import one_line

FID_WEIGHTS_URL = pf_inception.FID_WEIGHTS_URL
FID_WEIGHTS_FILE = FID_WEIGHTS_URL.rsplit("/", 1)[-1]
FID_WEIGHTS_SHA256_PREFIX = FID_WEIGHTS_FILE.rsplit("-", 1)[-1].split(".")[0]  # torch hub's naming
FID_DIM = 2048


class FIDWeightsUnavailable(RuntimeError):
    """No Inception weights could be had; the message is one line with every place tried."""


def fid_inception_architecture() -> nn.Module:
    """The FID network's layers with random weights, as a state dict's template.

    Its features mean nothing: it serves to time feature extraction and to test code
    paths where the real weights can't be downloaded. Nothing falls back to it.
    """
    net = pf_inception._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    net.Mixed_5b = pf_inception.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = pf_inception.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = pf_inception.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = pf_inception.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = pf_inception.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = pf_inception.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = pf_inception.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = pf_inception.FIDInceptionE_1(1280)
    net.Mixed_7c = pf_inception.FIDInceptionE_2(2048)
    return net


def hub_weights_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS_FILE


def find_fid_weights(configured: str = "", download: bool = True, timeout_s: float = 20.0) -> Path:
    """The weights file: ``configured`` if given, else the hub cache, else a fresh download."""
    if configured:
        path = Path(configured).expanduser()
        if not path.is_file():
            raise FIDWeightsUnavailable(f"eval.fid-weights = {configured!r}: no such file")
        return path
    cached = hub_weights_path()
    if cached.is_file():
        return cached
    if not download:
        raise FIDWeightsUnavailable(f"Inception FID weights are not in {cached} and downloading is off")
    cached.parent.mkdir(parents=True, exist_ok=True)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout_s)  # an unreachable host must not hang an evaluation round
    try:
        torch.hub.download_url_to_file(
            FID_WEIGHTS_URL, str(cached), hash_prefix=FID_WEIGHTS_SHA256_PREFIX, progress=False
        )
    except Exception as err:  # noqa: BLE001 - any failure means "no weights", said in one line
        reason = one_line(err)
        raise FIDWeightsUnavailable(
            f"Inception FID weights: not configured (eval.fid-weights), not in {cached}, "
            f"and the download from {FID_WEIGHTS_URL} failed: {reason}"
        ) from None
    finally:
        socket.setdefaulttimeout(previous)
    return cached


def load_fid_inception(weights: Path) -> nn.Module:
    """InceptionV3 pool3 (2048-d) features with the given FID weights, in eval mode.

    pytorch-fid builds its network and fetches the weights in one function; we hand it the
    state dict we found instead of letting it reach for the network.
    """
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        raise FIDWeightsUnavailable(f"{weights}: not a readable weights file ({type(err).__name__})") from None
    if not isinstance(state, dict):
        raise FIDWeightsUnavailable(f"{weights}: holds a {type(state).__name__}, not a state dict")
    with mock.patch.object(pf_inception, "load_state_dict_from_url", lambda *a, **k: state):
        try:
            net = pf_inception.InceptionV3([pf_inception.InceptionV3.BLOCK_INDEX_BY_DIM[FID_DIM]])
        except RuntimeError as err:
            first = str(err).strip().splitlines()[0]
            raise FIDWeightsUnavailable(f"{weights}: not the FID Inception weights ({first})") from None
    return net.eval()


class InceptionFeatures(nn.Module):
    """[-1, 1] images of any size and 1 or 3 channels -> (B, 2048), as pytorch-fid scores PNGs."""

    name = "fid"
    dim = FID_DIM

    def __init__(self, weights: Path) -> None:
        super().__init__()
        self.net = load_fid_inception(weights)
        self.ident = f"{weights.name}-{os.path.getsize(weights)}"

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = ((x.clamp(-1, 1) + 1) * 127.5).round() / 255.0  # the uint8 values a saved image holds
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return self.net(x)[0].flatten(1)

"""A deployment with TLS and SuperNode authentication: certificates from scripts/make_certs.sh, two
registered SuperNodes that train, and an unregistered one that the SuperLink refuses.

One deployment serves the module; every process is started by ``scripts/local_deployment.py`` and
stopped by its PID when the module is done, failures included.
"""

from __future__ import annotations

import math
import shutil
import socket
import ssl
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from fedapp.runs.checkpoint import load_checkpoint
from fedapp.runs.rundir import read_jsonl
from tests.support.markers import needs_fmnist

REPO = Path(__file__).resolve().parents[1]
MAKE_CERTS = REPO / "scripts" / "make_certs.sh"
from fedapp.deploy.local import LocalDeployment
from fedapp.deploy.processes import HOST

needs_tools = pytest.mark.skipif(not (shutil.which("openssl") and shutil.which("ssh-keygen")),
                                 reason="make_certs.sh needs openssl and ssh-keygen")

TINY: dict[str, object] = {
    "model.dim": 8, "model.dim-mults": "1,2", "data.max-train-examples": 300, "train.rounds": 2,
    "train.batch-size": 16, "train.max-steps-per-round": 2, "train.num-threads": 1, "eval.every": 0,
    "eval.metric-samples": 0, "eval.fid": "off", "output.progress": False, "output.name": "tls",
    "strategy.min-nodes": 2, "strategy.fraction-evaluate": 0.0,  # no federated evaluate: half the messages
}


def make_certs(directory: Path, nodes: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(MAKE_CERTS), str(directory), str(nodes)], capture_output=True,
                          text=True, timeout=120, check=False)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalDeployment]:
    """Keys for 3 nodes, of which LocalDeployment registers and starts node-0 and node-1 only."""
    root = tmp_path_factory.mktemp("tls")
    made = make_certs(root / "certs", 3)
    assert made.returncode == 0, made.stderr
    with LocalDeployment(root / "deployment", 2, tls_dir=root / "certs", auth=True) as started:
        yield started


@needs_tools
def test_make_certs_writes_keys_flower_accepts_and_never_overwrites(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    made = make_certs(certs, 2)
    assert made.returncode == 0, made.stderr
    for private in ("ca.key", "server.key", "node-0", "node-1"):
        assert stat.S_IMODE((certs / private).stat().st_mode) == 0o600, private
    # What flower-supernode --auth-supernode-private-key and `flwr supernode register` load.
    key = load_ssh_private_key((certs / "node-0").read_bytes(), None)
    public = load_ssh_public_key((certs / "node-0.pub").read_bytes())
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert isinstance(public, ec.EllipticCurvePublicKey) and public == key.public_key()
    verified = subprocess.run(["openssl", "verify", "-CAfile", str(certs / "ca.crt"),
                               str(certs / "server.pem")], capture_output=True, text=True, check=False)
    assert verified.returncode == 0, verified.stdout + verified.stderr

    before = (certs / "ca.key").read_bytes()
    again = make_certs(certs, 2)
    assert again.returncode != 0 and "refusing" in again.stderr
    assert (certs / "ca.key").read_bytes() == before


@pytest.mark.e2e
@needs_fmnist
@needs_tools
def test_superlink_serves_tls_with_a_certificate_for_loopback(deployment: LocalDeployment) -> None:
    context = ssl.create_default_context(cafile=str(deployment.tls_dir / "ca.crt"))  # type: ignore[operator]
    with socket.create_connection((HOST, deployment.port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname=HOST) as tls:  # checks the chain and the SAN
        assert tls.version() in ("TLSv1.2", "TLSv1.3")
    assert "Uvicorn running on https://" in (deployment.workdir / "superlink.log").read_text()


@pytest.mark.e2e
@needs_fmnist
@needs_tools
def test_an_unregistered_supernode_is_refused(deployment: LocalDeployment) -> None:
    """Flower 1.41: ActivateNode finds no node for the key, answers 412 (code 2004), the node exits 1."""
    unregistered = deployment.tls_dir / "node-2"  # type: ignore[operator]
    stranger, log = deployment.start_node(unregistered, name="supernode-unregistered")
    try:
        returncode = stranger.wait(timeout=90)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the unregistered SuperNode still runs after 90 s:\n{log.read_text()[-2000:]}")
    text = log.read_text()
    assert returncode != 0, text[-2000:]
    assert "Failed to activate SuperNode" in text, text[-2000:]
    link_log = (deployment.workdir / "superlink.log").read_text()
    assert "No SuperNode found with the given public key" in link_log
    listed = {int(node["node-id"]): node["status"] for node in deployment.nodes()}
    assert listed == dict.fromkeys(deployment.node_ids, "online")  # only the registered two, still online


@pytest.mark.e2e
@needs_fmnist
@needs_tools
def test_two_registered_supernodes_train_two_rounds_over_tls(deployment: LocalDeployment) -> None:
    runs = deployment.workdir / "runs"
    config = {**TINY, "output.dir": str(runs), "train.node-state-dir": str(deployment.workdir / "nodes")}
    started = time.monotonic()
    done = deployment.run(config, timeout=480)
    assert done.returncode == 0, done.stdout[-4000:]
    run = runs / "tls"
    assert (run / "final.pt").is_file(), f"{done.stdout[-4000:]}\n(after {time.monotonic() - started:.0f} s)"
    model, cfg, payload = load_checkpoint(run / "final.pt")
    assert payload["round"] == 2 and cfg.train.rounds == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["round"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["train"]["train-loss"]) for r in rows)

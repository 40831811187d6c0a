"""A deployment across simulated hosts: the SuperLink, two SuperNodes and `flwr` each in a network namespace
of its own, joined by veth pairs to a bridge, with TLS and registered SuperNode keys.

On loopback every process shares one interface, so nothing there shows that the deployment works across
hosts. Here the SuperLink listens only on its namespace's address, its certificate names that address, and
the veth counters show the model's bytes crossing the interfaces. Needs root (CAP_NET_ADMIN) and iproute2:
where a namespace cannot be made, the tests skip and say why. Nothing is left behind, failures included.
"""

from __future__ import annotations

import math
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from cryptography import x509

from fedapp.deploy import netns
from fedapp.deploy.local import LocalDeployment
from fedapp.deploy.netns import NetnsUnavailable, Network, Placement, namespaces
from fedapp.runs.checkpoint import load_checkpoint
from fedapp.runs.rundir import read_jsonl
from tests.support.markers import needs_fmnist

REPO = Path(__file__).resolve().parents[1]
MAKE_CERTS = REPO / "scripts" / "make_certs.sh"
HOSTS = ("link", "node-0", "node-1", "admin")  # the SuperLink, the SuperNodes, and where `flwr` runs
needs_tools = pytest.mark.skipif(not (shutil.which("openssl") and shutil.which("ssh-keygen")),
                                 reason="make_certs.sh needs openssl and ssh-keygen")

TINY: dict[str, object] = {  # tests/test_deployment_tls.py's
    "model.dim": 8, "model.dim-mults": "1,2", "data.max-train-examples": 300, "train.rounds": 2,
    "train.batch-size": 16, "train.max-steps-per-round": 2, "train.num-threads": 1, "eval.every": 0,
    "eval.metric-samples": 0, "eval.fid": "off", "output.progress": False, "output.name": "netns",
    "strategy.min-nodes": 2, "strategy.fraction-evaluate": 0.0,
}


def make_certs(directory: Path, nodes: int, *addresses: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(MAKE_CERTS), str(directory), str(nodes), *addresses],
                          capture_output=True, text=True, timeout=120, check=False)


@contextmanager
def network(names: tuple[str, ...]) -> Iterator[Network]:
    """A Network, or a skip with the reason it cannot be made; afterwards, none of its namespaces left."""
    net = Network(names)
    try:
        net.__enter__()
    except NetnsUnavailable as err:
        pytest.skip(f"cannot simulate hosts with network namespaces here: {err}")
    try:
        yield net
    finally:
        net.remove()
    assert not [name for name in namespaces() if name.startswith(f"{netns.PREFIX}{net.tag}-")]


def test_namespaces_reach_each_other_only_through_the_bridge_and_vanish_on_error() -> None:
    tag = ""
    with pytest.raises(ZeroDivisionError), network(("a", "b")) as net:
        tag = net.tag
        a, b = net.place("a"), net.place("b")
        assert net.addresses["a"] != net.addresses["b"] and a.netns != b.netns
        with a.socket() as server, b.socket() as client:
            server.bind((a.address, 0))
            server.listen()
            client.settimeout(10)
            client.connect(server.getsockname())
            accepted, peer = server.accept()
            with accepted:
                assert peer[0] == b.address  # from b's address: the packets went b -> bridge -> a
                accepted.sendall(b"x" * 100_000)
                received = 0
                while received < 100_000:
                    received += len(client.recv(65536))
            with a.socket() as other:  # bound to a's address only: a's own loopback does not answer
                assert other.connect_ex(("127.0.0.1", server.getsockname()[1])) != 0
        assert net.counters("b")[0] >= 100_000 and net.counters("a")[1] >= 100_000
        1 / 0  # noqa: B018 - an error inside the block: everything must still be removed
    assert tag and not [name for name in namespaces() if name.startswith(f"{netns.PREFIX}{tag}-")]


def test_no_ip_binary_is_a_reason_given_not_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(netns, "ip_binary", lambda: None)
    with pytest.raises(NetnsUnavailable, match="no `ip` binary"):
        Network(["a"]).__enter__()


@needs_tools
def test_make_certs_adds_the_superlinks_own_addresses(tmp_path: Path) -> None:
    made = make_certs(tmp_path / "certs", 1, "10.7.8.9", "link.example")
    assert made.returncode == 0, made.stderr
    cert = x509.load_pem_x509_certificate((tmp_path / "certs" / "server.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "10.7.8.9"]
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "link.example"]
    refused = make_certs(tmp_path / "bad", 1, "10.7.8.300")
    assert refused.returncode == 2 and "10.7.8.300" in refused.stderr and not (tmp_path / "bad").exists()


@pytest.mark.e2e
@needs_fmnist
@needs_tools
def test_a_federation_across_namespaces_with_tls_and_registered_nodes(tmp_path: Path) -> None:
    with network(HOSTS) as net:
        link, admin = net.place("link"), net.place("admin")
        made = make_certs(tmp_path / "certs", 2, link.address)
        assert made.returncode == 0, made.stderr
        placement = Placement(link, (net.place("node-0"), net.place("node-1")), admin)
        workdir = tmp_path / "deployment"
        config = {**TINY, "output.dir": str(workdir / "runs"), "train.node-state-dir": str(workdir / "nodes")}
        with LocalDeployment(workdir, 2, tls_dir=tmp_path / "certs", auth=True, placement=placement) as dep:
            assert dep.address == f"{link.address}:{dep.port}"
            with link.socket() as probe:  # the SuperLink listens on its address only, not on 127.0.0.1
                assert probe.connect_ex(("127.0.0.1", dep.port)) != 0
            context = ssl.create_default_context(cafile=str(tmp_path / "certs" / "ca.crt"))
            with admin.socket() as raw:  # another host checks the chain and that the SAN names the address
                raw.settimeout(10)
                raw.connect((link.address, dep.port))
                with context.wrap_socket(raw, server_hostname=link.address) as tls:
                    assert tls.version() in ("TLSv1.2", "TLSv1.3")
            before = {name: net.counters(name) for name in HOSTS}
            done = dep.run(config, timeout=300)
            after = {name: net.counters(name) for name in HOSTS}
            listed = {int(node["node-id"]): node["status"] for node in dep.nodes()}
            node_ids = dep.node_ids
        assert done.returncode == 0, done.stdout[-4000:]
        assert listed == dict.fromkeys(node_ids, "online"), listed
        # Stopped by pid through `ip netns exec`: nothing of the deployment is left in any namespace.
        deadline = time.monotonic() + 10
        while (left := {name: pids for name in HOSTS if (pids := net.pids(name))}) \
                and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not left, left

    run = workdir / "runs" / "netns"
    assert (run / "final.pt").is_file(), done.stdout[-4000:]
    _, cfg, payload = load_checkpoint(run / "final.pt")
    assert payload["round"] == 2 == cfg.train.rounds
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["round"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["train"]["train-loss"]) for r in rows)
    transfers = read_jsonl(run / "comm.jsonl")
    for server_round in (1, 2):  # both registered nodes trained and replied in every round
        uploads = {t["node_id"] for t in transfers if t["server_round"] == server_round
                   and t["message_type"] == "train" and t["direction"] == "up" and t["params"] > 0}
        assert uploads == set(node_ids), (server_round, uploads, node_ids)

    # The model's bytes crossed the veths: each node received what the server sent it and sent what it
    # uploaded, and the SuperLink's interface carried both. TLS and HTTP framing only add to them.
    grew = {name: (after[name][0] - before[name][0], after[name][1] - before[name][1]) for name in HOSTS}
    wire = {(t["node_id"], t["direction"]): 0 for t in transfers}
    for t in transfers:
        wire[t["node_id"], t["direction"]] += t["wire"]
    for i, node_id in enumerate(node_ids):
        down, up = wire.get((node_id, "down"), 0), wire.get((node_id, "up"), 0)
        assert down > 0 and up > 0, wire
        assert grew[f"node-{i}"][0] >= down and grew[f"node-{i}"][1] >= up, (grew, wire)
    total_down = sum(v for (_, direction), v in wire.items() if direction == "down")
    total_up = sum(v for (_, direction), v in wire.items() if direction == "up")
    assert grew["link"][1] >= total_down and grew["link"][0] >= total_up, (grew, total_down, total_up)
    assert grew["admin"][0] > 0 and grew["admin"][1] > 0  # `flwr run` itself came over the bridge
    assert socket.inet_aton(link.address)  # an IPv4 address of the test's own, not loopback
    assert not link.address.startswith("127.")

"""A ``flwr run`` simulation on a Ray cluster that is already running (``fedapp run --ray-address``).

Why an environment variable and not a federation-config key: flwr 1.42 has none for the address.
``flwr-simulation`` passes on only ``init-args-num-cpus``, ``-num-gpus``, ``-logging-level`` and
``-log-to-driver`` (``flwr/simulation/app.py``), and its Ray backend calls ``ray.init(runtime_env=...,
include_dashboard=False, **init_args)`` without an ``address`` (``flwr/server/superlink/fleet/vce/
backend/raybackend.py``). Ray then takes ``RAY_ADDRESS`` from the environment, which reaches it
through ``flwr run`` -> ``flower-superlink`` -> ``flwr-simulation`` (each one inherits it).

Two checks before anything starts. ``ray.init`` refuses ``num_cpus``/``num_gpus`` when it joins a
cluster ("When connecting to an existing cluster, num_cpus and num_gpus must not be provided",
``ray/_private/worker.py``), so ``init-args-num-cpus``/``-num-gpus`` are refused here in one line
instead of failing inside ``flwr-simulation``. And an address nothing answers at fails here, named.

A local simulation that names no cluster gets ``RAY_ADDRESS=local`` (``simulation_env``): without it,
``ray.init()`` joins whatever ``ray start`` last started on this machine (``/tmp/ray/ray_current_cluster``,
``ray/_private/services.py``), where ``init-args-num-cpus`` (as ``make run`` passes it) fails the run.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping

RAY_ADDRESS = "RAY_ADDRESS"
# flwr-simulation hands these to ray.init as num_cpus / num_gpus, which it refuses for a running cluster.
NOT_FOR_A_CLUSTER = ("init-args-num-cpus", "init-args-num-gpus")


def parse_ray_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` of a Ray head's GCS (``ray start --head --port PORT``), as (host, port)."""
    host, sep, port = text.strip().rpartition(":")
    host = host.strip("[]")  # [::1]:6379
    if "://" in text or not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--ray-address {text!r} is not HOST:PORT of a Ray head (the --port of "
                         "`ray start --head`, 6379 by default), e.g. 10.0.0.5:6379")
    return host, int(port)


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """A TCP connection to the head's GCS port, so a typo or a stopped cluster fails here, named."""
    host, port = parse_ray_address(address)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as err:
        reason = "timed out" if isinstance(err, TimeoutError) else (err.strerror or str(err))
        raise ValueError(f"--ray-address {address}: no Ray head answers there ({reason}); is "
                         f"`ray start --head --port {port}` running on {host}?") from None


def refuse_init_args(federation_config: str, address: str) -> None:
    """``init-args-num-cpus``/``-num-gpus`` cannot size a cluster that exists: ``ray start`` sized it."""
    keys = {item.split("=", 1)[0] for item in federation_config.split()}
    if given := [key for key in NOT_FOR_A_CLUSTER if key in keys]:
        raise ValueError(f"{' and '.join(given)} cannot be set when joining the Ray cluster at {address} "
                         "(ray.init refuses num_cpus/num_gpus there): each node's `ray start --num-cpus N "
                         "--num-gpus G` sets them; keep client-resources-num-cpus/-num-gpus")


def ray_env(env: Mapping[str, str], address: str, federation_config: str) -> dict[str, str]:
    """The ``RAY_ADDRESS`` a local simulation's ``flwr run`` gets, after the checks above.

    ``address`` (``--ray-address``) wins; else a ``RAY_ADDRESS`` already in ``env`` stays (Ray's own
    way, also ``auto`` or ``ray://``), checked for init-args only; else ``local``: a Ray of its own.
    """
    joined = address or env.get(RAY_ADDRESS, "")
    if joined and joined != "local":
        refuse_init_args(federation_config, joined)
    if address:
        check_reachable(address)
    return {RAY_ADDRESS: joined or "local"}

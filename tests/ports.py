"""Free TCP ports for servers the tests start (containers share the host's network)."""

import socket

import numpy as np


def free_ports(count: int) -> int:
    """The first of `count` consecutive ports free on every interface."""
    rng = np.random.default_rng()
    for _ in range(100):
        base = int(rng.integers(20000, 60000 - count))
        try:
            for port in range(base, base + count):
                with socket.socket() as probe:
                    probe.bind(("0.0.0.0", port))
        except OSError:
            continue
        return base
    raise RuntimeError("no free port range")

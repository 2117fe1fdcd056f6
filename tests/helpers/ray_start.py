"""`ray start` with its node address kept as given: `python tests/helpers/ray_start.py start --block ...`.

Ray turns a node address of 127.0.0.1 into the machine's routable one (`resolve_ip_for_localhost`),
and its servers then listen on every interface. With that one function made to keep the address,
a node started with `--node-ip-address=127.0.0.1` puts every server on loopback, and a worker node
still joins (Ray's one-machine switch, which keeps 127.0.0.1 too, refuses worker nodes). Drivers of
such a cluster join by its loopback address with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0.
"""

from __future__ import annotations

import sys


def main() -> None:
    import ray._private.services as services
    from ray.scripts.scripts import main as ray_main

    services.resolve_ip_for_localhost = lambda host: host
    sys.argv = ["ray", *sys.argv[1:]]
    ray_main()


if __name__ == "__main__":
    main()

"""A Ray cluster of several nodes on this machine, for the tests of `nps run --ray`, controlled over stdin.

Run it inside a fresh network namespace that holds only the loopback interface, so that nothing Ray starts can be
reached from outside (Ray would otherwise bind to the machine's outward address)::

    unshare -n sh -c 'ip link set lo up && exec python tests/ray_cluster.py --nodes 3 --gpus 1 --cpus 1 --temp DIR'

It prints one JSON line when the cluster is up (``{"address": ..., "nodes": [node ids]}``), then obeys one
command per line, answering each with a JSON line: ``kill I`` (node I dies at once, its processes SIGKILLed; the
head is node 0), ``add`` (a new node joins), ``quit`` (every node shut down, then exit). Programs that should talk
to the cluster run in the same namespace: ``nsenter --net=/proc/<pid of this process>/ns/net COMMAND``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--gpus", type=int, default=1, help="fake GPU resources per node")
    parser.add_argument("--cpus", type=int, default=1)
    parser.add_argument("--temp", required=True, help="Ray's temp directory (short: socket paths are limited)")
    args = parser.parse_args()
    # Ray's cluster_utils writes the head's address to <RAY_TMPDIR>/ray/ray_current_cluster (default /tmp/ray, which
    # a fresh machine lacks): keep it inside this cluster's own temp directory, where no other Ray client looks.
    temp = os.path.abspath(args.temp)
    os.makedirs(os.path.join(temp, "ray"), exist_ok=True)
    os.environ["RAY_TMPDIR"] = temp

    from ray.cluster_utils import Cluster

    node_args = {"num_cpus": args.cpus, "num_gpus": args.gpus, "object_store_memory": 100 * 2**20}
    cluster = Cluster(initialize_head=True, head_node_args={**node_args, "include_dashboard": False,
                                                            "temp_dir": args.temp})
    nodes = [cluster.head_node] + [cluster.add_node(**node_args) for _ in range(args.nodes - 1)]
    cluster.wait_for_nodes()

    def say(**payload) -> None:
        print(json.dumps(payload), flush=True)

    say(address=cluster.address, nodes=[n.node_id for n in nodes])
    for line in sys.stdin:
        command = line.split()
        if not command:
            continue
        if command[0] == "kill":
            node = nodes[int(command[1])]
            cluster.remove_node(node, allow_graceful=False)
            say(killed=node.node_id)
        elif command[0] == "add":
            node = cluster.add_node(**node_args)
            nodes.append(node)
            say(added=node.node_id)
        elif command[0] == "quit":
            break
    cluster.shutdown()
    say(stopped=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The page owner: one actor per node that owns the KV pages in that node's object store.

An object in Ray's object store is lost when its owner dies, and its owner is the process that
put it (Ray 2.56 removed ray.put's `_owner`). The prefill actor makes the pages (cache_store/
wire.py share_updates) but is restarted on faults, so it hands them to this actor, which puts
them: a page then lives while any replica or update refers to it, whichever model actor dies.
The actor does nothing else and is detached, so nothing kills it but the loss of its node (whose
object store goes with it; a replica that misses an update's pages is then restored from a
snapshot: AnswerWorker.apply). Handing pages over costs one copy in shared memory per commit call,
not a transfer: the owner runs on the prefill actor's node.
"""

from __future__ import annotations

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from actors.calls import NAMESPACE
from actors.release import LARGE_BUFFERS_MAPPED, with_env


class PageOwner:
    def put(self, pages: list) -> list[ray.ObjectRef]:
        """Each of `pages` (one update's) put here, so that this actor owns them (references in a
        list: Ray passes them back as references, not values)."""
        return [ray.put(p) for p in pages]


def local_page_owner():
    """This node's page owner (started on first use)."""
    node = ray.get_runtime_context().get_node_id()
    options = with_env({"num_cpus": 0, "max_restarts": -1}, LARGE_BUFFERS_MAPPED)  # (it serializes pages)
    return ray.remote(PageOwner).options(
        name=f"pages-{node}", namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False), **options).remote()

"""One local Ray runtime for the whole test session.

`ray_runtime` (session): `ray.init` once with 4 logical CPUs (the machine has 2 cores: every actor
in the tests asks for a fraction, e.g. `num_cpus=0.05`), no dashboard, worker logs kept out of
the test output, and a job-wide `runtime_env` whose `PYTHONPATH` starts with the repository root
(found from this file's location), so actor workers can import `actors`, `pipeline`,
`cache_store` and the test modules; and one unit of the custom resource `SINGLE_SLOT`, which
a test gives an actor kind so that the cluster can place one actor of it and no second. Yields
a small info object (`.repo_root`, `.gcs_address`, `.port`). Ray is shut down at the end of the
session.

Ports: `ray.init()` without an address starts a private local cluster whose GCS listens on a
free port it picks itself; it never needs 6379 (the Redis default, which `ray start --head` would
take). The fixture checks this and fails loudly otherwise.

If Ray is already initialised in this process (some other fixture started it), that runtime is
reused and left running.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]  # tests/plugins/ray_runtime.py -> repository root
NUM_CPUS = 4
# The object store would take 30% of RAM by default; tests need a few hundred MB at most.
OBJECT_STORE_BYTES = int(os.environ.get("STREAMKV_TEST_OBJECT_STORE_BYTES", 512 * 2**20))
REDIS_PORT = 6379
SINGLE_SLOT = "single_slot"


@dataclass(frozen=True)
class RayRuntime:
    repo_root: Path
    gcs_address: str

    @property
    def port(self) -> int:
        return int(self.gcs_address.rsplit(":", 1)[1])


def _pythonpath() -> str:
    parts = [str(REPO_ROOT)]
    parts += [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(REPO_ROOT)]
    return os.pathsep.join(parts)


@pytest.fixture(scope="session")
def ray_runtime():
    import ray

    if ray.is_initialized():  # someone else owns it: reuse, do not shut down
        yield RayRuntime(REPO_ROOT, ray.get_runtime_context().gcs_address)
        return

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage reporting (no network here)
    ray.init(
        num_cpus=NUM_CPUS,
        num_gpus=0,
        resources={SINGLE_SLOT: 1},
        object_store_memory=OBJECT_STORE_BYTES,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        runtime_env={"env_vars": {"PYTHONPATH": _pythonpath()}},
    )
    try:
        runtime = RayRuntime(REPO_ROOT, ray.get_runtime_context().gcs_address)
        assert runtime.port != REDIS_PORT, f"Ray's GCS took the Redis port: {runtime.gcs_address}"
        yield runtime
    finally:
        ray.shutdown()

"""One process of the 2-process run of tests/test_multihost.py (not a test module).

Usage: python tests/_multihost_worker.py PORT PROCESS_ID STEPS
Prints one JSON line ``{"losses": [...]}`` (process 0 and 1 alike).
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")


def main() -> None:
    port, pid, steps = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=2,
        process_id=pid,
        initialization_timeout=60,
    )
    assert jax.device_count() == 4 and jax.local_device_count() == 2

    from tests.test_multihost import run_training

    losses = run_training(steps)
    print(json.dumps({"losses": losses}), flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()

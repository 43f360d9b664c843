"""How fast `fldd sweep --address` refuses a cluster whose head has no CPUs and no worker nodes
(`ray start --head --num-cpus=0` before any worker joined). Prints the exit status, the seconds
from the command's start (Python and Ray start-up included) and the message.

    python -m benchmarks.cpuless_head
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from ray.cluster_utils import Cluster


def main() -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        with tempfile.TemporaryDirectory(prefix="fldd-cpuless-") as tmp:
            sweep = Path(tmp) / "sweep.yaml"
            sweep.write_text(yaml.safe_dump({"base": "toy2d", "budgets": [2], "set": {"train.steps": 20},
                                             "space": {"parameterization": "masked-x0"}}))
            env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
            env["FLDD_HOME"] = str(Path(tmp) / "home")
            start = time.perf_counter()
            result = subprocess.run([str(Path(sys.executable).parent / "fldd"), "sweep", "--config", str(sweep),
                                     "--address", cluster.address], capture_output=True, text=True, timeout=300,
                                    env=env)
            seconds = time.perf_counter() - start
        last = (result.stderr.strip().splitlines() or [""])[-1]
        print(f"exit {result.returncode} after {seconds:.1f} s: {last}")
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main()

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("distributed_btu.py")


@pytest.mark.skipif(shutil.which("accelerate") is None, reason="needs the accelerate CLI")
def test_all_ranks_agree_on_the_flagged_set(tmp_path):
    # accelerate's --cpu launcher needs MPI for several processes; its torchrun launcher with ACCELERATE_USE_CPU
    # gives two gloo CPU processes instead.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    cmd = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(SCRIPT), str(tmp_path)]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world"] == ranks[1]["world"] == 2
    assert ranks[0]["candidates"] and ranks[0]["candidates"] == ranks[1]["candidates"]
    assert ranks[0]["flagged"] and ranks[0]["flagged"] == ranks[1]["flagged"]
    assert ranks[0]["flagged_row_sum"] == pytest.approx(ranks[1]["flagged_row_sum"])

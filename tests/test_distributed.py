"""Several processes: BTU under data parallelism (DDP, two gloo CPU processes) and the trainer's refusal of sharded
parameters (FSDP, DeepSpeed) for defenses that read or rewrite whole parameter tensors."""

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from hf_backdoor.defenses.base import Defense, DefenseConfig
from tests.conftest import registered, text_trainer

DDP_SCRIPT = Path(__file__).with_name("distributed_btu.py")
FSDP_SCRIPT = Path(__file__).with_name("distributed_fsdp_btu.py")
REFUSAL = r"\['btu'\] read or rewrite whole parameter tensors \(e\.g\. the word-embedding matrix\), which {} shards"


@pytest.mark.skipif(shutil.which("accelerate") is None, reason="needs the accelerate CLI")
def test_all_ranks_agree_on_the_flagged_set(tmp_path):
    # accelerate's --cpu launcher needs MPI for several processes; its torchrun launcher with ACCELERATE_USE_CPU
    # gives two gloo CPU processes instead.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    cmd = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(DDP_SCRIPT), str(tmp_path)]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world"] == ranks[1]["world"] == 2
    assert ranks[0]["candidates"] and ranks[0]["candidates"] == ranks[1]["candidates"]
    assert ranks[0]["flagged"] and ranks[0]["flagged"] == ranks[1]["flagged"]
    assert ranks[0]["flagged_row_sum"] == pytest.approx(ranks[1]["flagged_row_sum"])


def test_sharded_parameters_are_refused_when_the_trainer_is_built(tmp_path, tiny_train, tokenizer):
    """The guard itself, in one process: the trainer's FSDP/DeepSpeed flags set as the Trainer sets them from its
    accelerator (a real FSDP launch needs accelerators; see the test below)."""
    trainer = text_trainer(tmp_path, tiny_train, tokenizer, defense="btu")
    trainer.is_fsdp_enabled = True
    with pytest.raises(ValueError, match=REFUSAL.format("FSDP")) as refusal:
        trainer._check_distributed()
    assert "data parallelism (DDP" in str(refusal.value)  # says what does work
    trainer.is_fsdp_enabled, trainer.is_deepspeed_enabled = False, True
    with pytest.raises(ValueError, match=REFUSAL.format("DeepSpeed")):
        trainer._check_distributed()

    @dataclass
    class ShardSafeConfig(DefenseConfig):
        name = "shard_safe"

    class ShardSafe(Defense):
        supports_sharded_parameters = True

    with registered(ShardSafeConfig, ShardSafe):
        trainer = text_trainer(tmp_path, tiny_train, tokenizer, defense=ShardSafeConfig())
        trainer.is_fsdp_enabled = True
        trainer._check_distributed()  # a defense that declares it can work on shards is let through


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="needs torchrun")
def test_fsdp_launch_with_btu(tmp_path):
    """Two processes launched with FSDP in the training arguments (``fsdp=True``). With accelerators FSDP is on and
    building the trainer with BTU fails at once on every rank, before any data is read. On CPU, accelerate leaves
    FSDP off (it sets FSDP up only for accelerator back ends, not for gloo CPU processes), so the processes run as
    plain data parallelism and BTU is built as under DDP."""
    devices = torch.cuda.device_count()
    processes = min(2, devices) if devices else 2
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = ["torchrun", "--standalone", f"--nproc_per_node={processes}", str(FSDP_SCRIPT), str(tmp_path)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(processes)]
    assert all(rank["world"] == processes for rank in ranks)
    for rank in ranks:
        if devices:
            assert rank["fsdp_enabled"] and rank["refused"], rank
            assert "FSDP shards across processes" in rank["refused"] and rank["seconds"] < 30
        else:
            assert rank == {**rank, "fsdp_enabled": False, "distributed_type": "MULTI_CPU", "refused": None}

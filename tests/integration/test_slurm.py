"""The Slurm template trains the tiny config through a real Slurm (slurmctld + slurmd on
localhost, CPU, gloo): one srun task per node, torchrun, two training processes at TP=2."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from megatron_ext.distributed import free_port
from megatron_ext.training.metrics import read_metrics
from tests.integration.test_training import REPO

SLURM_CONF = """\
ClusterName=megatron-ext-test
SlurmctldHost=localhost
SlurmUser=root
AuthType=auth/none
CredType=cred/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SchedulerType=sched/builtin
ReturnToService=2
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
MinJobAge=4
MailProg=/bin/true
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A one-node Slurm cluster on localhost, as long as the module's tests run."""
    missing = [d for d in ("slurmctld", "slurmd", "sbatch") if shutil.which(d) is None]
    if missing:
        pytest.skip(
            f"Slurm is not installed ({', '.join(missing)} missing): apt-get install -y "
            "--no-install-recommends slurmctld slurmd slurm-client"
        )
    if os.geteuid() != 0:
        pytest.skip("the localhost Slurm cluster runs its daemons as root")
    root = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool"):
        (root / sub).mkdir()
    conf = root / "slurm.conf"
    conf.write_text(
        SLURM_CONF.format(
            root=root, ctld_port=free_port(), d_port=free_port(), cpus=os.cpu_count() or 1
        )
    )
    env = {**os.environ, "SLURM_CONF": str(conf)}
    daemons = [
        subprocess.Popen(["slurmctld", "-D", "-f", str(conf)], env=env, start_new_session=True),
        subprocess.Popen(
            ["slurmd", "-D", "-f", str(conf), "-N", "localhost"], env=env, start_new_session=True
        ),
    ]
    try:
        deadline = time.monotonic() + 60
        while True:
            state = subprocess.run(
                ["sinfo", "-h", "-N", "-o", "%t"], env=env, capture_output=True, text=True
            ).stdout.strip()
            if state == "idle":
                break
            if time.monotonic() > deadline:
                logs = "\n".join(
                    (root / name).read_text()[-2000:]
                    for name in ("slurmctld.log", "slurmd.log")
                    if (root / name).exists()
                )
                pytest.fail(f"Slurm node never became idle (state {state!r}):\n{logs}")
            time.sleep(0.5)
        yield env
    finally:
        for daemon in daemons:
            os.killpg(daemon.pid, signal.SIGTERM)
        for daemon in daemons:
            daemon.wait(timeout=30)


def test_tiny_config_trains_through_the_sbatch_template(
    slurm, tmp_path, small_tokenizer, training_data
):
    save = tmp_path / "run"
    env = {
        **slurm,
        "SAVE": str(save),
        "GPUS_PER_NODE": "2",
        "PYTHON": sys.executable,
        "MEGATRON_EXT_HOME": str(REPO),
    }
    job = subprocess.run(
        [
            "sbatch", "--wait", "--parsable", "--nodes", "1",
            "--output", str(tmp_path / "job-%j.out"), "--chdir", str(tmp_path),
            str(REPO / "examples/slurm/train.sbatch"),
            "--config", str(REPO / "examples/configs/tiny.yaml"),
            "--tokenizer-model", str(small_tokenizer),
            "--data-path", "0.25", training_data["en"], "0.75", training_data["ar"],
            "--data-cache-path", str(tmp_path / "cache"),
            "--tensor-model-parallel-size", "2",
            "--train-iters", "16", "--eval-interval", "0", "--save-interval", "0",
        ],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    logs = "\n".join(p.read_text() for p in tmp_path.glob("job-*.out"))
    assert job.returncode == 0, f"{job.stderr}\n{logs[-4000:]}"
    assert "1 node(s) x 2 processes" in logs
    assert "train: done at iteration 16" in logs
    assert [e["step"] for e in read_metrics(save / "metrics.jsonl") if "split" not in e] == list(
        range(1, 17)
    )
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "16"
    assert not (save / "interrupted.json").exists()

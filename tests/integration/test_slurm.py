"""The Slurm template trains the tiny config through a real Slurm (slurmctld + slurmd on
localhost, CPU, gloo): one srun task per node, torchrun, two training processes at TP=2."""

from __future__ import annotations

import json
import os
import re
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


def _submit(
    slurm, tmp_path, small_tokenizer, training_data, *args: str, wait: bool
) -> subprocess.CompletedProcess:
    """sbatch the template on the tiny config at TP=2 over two processes; its checkpoints go to
    ``tmp_path/run``. With ``wait`` sbatch returns when the job has ended."""
    env = {
        **slurm,
        "SAVE": str(tmp_path / "run"),
        "GPUS_PER_NODE": "2",
        "PYTHON": sys.executable,
        "MEGATRON_EXT_HOME": str(REPO),
    }
    return subprocess.run(
        [
            "sbatch", *(["--wait"] if wait else []), "--parsable", "--nodes", "1",
            "--output", str(tmp_path / "job-%j.out"), "--chdir", str(tmp_path),
            str(REPO / "examples/slurm/train.sbatch"),
            "--config", str(REPO / "examples/configs/tiny.yaml"),
            "--tokenizer-model", str(small_tokenizer),
            "--data-path", "0.25", training_data["en"], "0.75", training_data["ar"],
            "--data-cache-path", str(tmp_path / "cache"),
            "--tensor-model-parallel-size", "2", "--eval-interval", "0", "--save-interval", "0",
            *args,
        ],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip


def _job_logs(tmp_path) -> str:
    return "\n".join(p.read_text() for p in tmp_path.glob("job-*.out"))


def test_tiny_config_trains_through_the_sbatch_template(
    slurm, tmp_path, small_tokenizer, training_data
):
    job = _submit(slurm, tmp_path, small_tokenizer, training_data, "--train-iters", "16", wait=True)
    save = tmp_path / "run"
    logs = _job_logs(tmp_path)
    assert job.returncode == 0, f"{job.stderr}\n{logs[-4000:]}"
    assert "1 node(s) x 2 processes" in logs
    assert "train: done at iteration 16" in logs
    assert [e["step"] for e in read_metrics(save / "metrics.jsonl") if "split" not in e] == list(
        range(1, 17)
    )
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "16"
    assert not (save / "interrupted.json").exists()


def _squeue_state(slurm, job_id: str) -> str:
    return subprocess.run(
        ["squeue", "-h", "-j", job_id, "-o", "%T"], env=slurm, capture_output=True, text=True
    ).stdout.strip()


def test_sigterm_to_the_whole_job_saves_and_requeues(
    slurm, tmp_path, small_tokenizer, training_data
):
    """A SIGTERM to the training processes and to the batch shell: training saves, torchrun
    exits 1 (it was signalled), and the shell outlives the signal to re-queue the job."""
    save = tmp_path / "run"
    job = _submit(
        slurm, tmp_path, small_tokenizer, training_data, "--train-iters", "1000", wait=False
    )
    assert job.returncode == 0, job.stderr
    job_id = job.stdout.strip().split(";")[0]
    try:
        deadline = time.monotonic() + 300
        metrics = save / "metrics.jsonl"
        while not metrics.exists() or len(read_metrics(metrics)) < 2:
            assert time.monotonic() < deadline, _job_logs(tmp_path)[-4000:]
            time.sleep(1)
        for target in ([], ["--batch"]):  # the job step's processes, then the shell alone
            subprocess.run(["scancel", "--signal=TERM", *target, job_id], env=slurm, check=True)
        deadline = time.monotonic() + 120
        while "re-queueing" not in _job_logs(tmp_path):
            assert time.monotonic() < deadline, _job_logs(tmp_path)[-4000:]
            time.sleep(1)
    finally:
        subprocess.run(["scancel", job_id], env=slurm, check=False)
        while _squeue_state(slurm, job_id) not in ("", "CANCELLED", "COMPLETED"):
            time.sleep(1)
    logs = _job_logs(tmp_path)
    stopped = re.search(r"stopped early \((.*?)\); re-queueing", logs, re.DOTALL)
    assert stopped, logs[-4000:]
    iteration = json.loads(stopped.group(1))["iteration"]
    assert 0 < iteration < 1000
    # The checkpoint it re-queues on is complete and is the latest.
    latest = (save / "latest_checkpointed_iteration.txt").read_text().strip()
    assert int(latest) >= iteration and (save / f"iter_{int(latest):07d}").is_dir()

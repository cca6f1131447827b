"""GPU leases (paramdyn.gpus) between real concurrent processes, on simulated devices
(PARAMDYN_NUM_GPUS) and a temporary lock folder: no GPU needed."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from paramdyn import gpus

# a training job in miniature: lease, say what it got, hold the lease for argv[1] seconds
HOLDER = """
import logging, os, sys, time
logging.basicConfig(level=logging.INFO, format="%(message)s")
from paramdyn.gpus import lease_gpu
index = lease_gpu()
print(index, os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>"), flush=True)
time.sleep(float(sys.argv[1]))
"""


@pytest.fixture
def env(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CUDA_", "PARAMDYN_"))}
    env |= {
        "PARAMDYN_GPU_LOCK_DIR": str(tmp_path / "locks"),
        "PARAMDYN_NUM_GPUS": "2",
        "PARAMDYN_GPU_POLL_SECONDS": "0.05",
        "PARAMDYN_GPU_WAIT_SECONDS": "10",
    }
    return env


class Holder:
    def __init__(self, env: dict, hold: float, **extra: str):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(hold)],
            env=env | extra,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def leased(self, timeout: float = 10.0) -> tuple[str, str]:
        """(returned index, CUDA_VISIBLE_DEVICES) once the holder has its lease."""
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, "no lease in time"
        line = self.proc.stdout.readline()
        assert line, f"holder died: {self.proc.stderr.read()}"
        index, visible = line.split()
        return index, visible

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.proc.stdout.close()
        self.proc.stderr.close()


@pytest.fixture
def holders():
    started: list[Holder] = []

    def start(env: dict, hold: float, **extra: str) -> Holder:
        h = Holder(env, hold, **extra)
        started.append(h)
        return h

    yield start
    for h in started:
        h.stop()


def test_two_concurrent_jobs_get_different_gpus(env, holders):
    a, b = holders(env, 30), holders(env, 30)
    got = {a.leased(), b.leased()}
    assert got == {("0", "0"), ("1", "1")}


def test_a_third_job_waits_for_a_free_gpu(env, holders):
    short, long = holders(env, 2.5), holders(env, 30)
    first = short.leased()
    long.leased()
    t0 = time.monotonic()
    third = holders(env, 30)
    assert third.leased() == first  # the GPU the short job gave back
    assert time.monotonic() - t0 > 0.5  # it waited
    third.proc.kill()
    assert "are leased; waiting" in third.proc.communicate()[1]


def test_a_killed_job_frees_its_gpu(env, holders):
    a, b = holders(env, 30), holders(env, 30)
    got_a, _ = a.leased(), b.leased()
    a.proc.send_signal(signal.SIGKILL)
    a.proc.wait()
    assert holders(env, 30).leased(timeout=3) == got_a


def test_no_free_gpu_fails_after_the_wait(env, holders):
    holders(env, 30).leased()
    holders(env, 30).leased()
    t0 = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-c", HOLDER, "0"],
        env=env | {"PARAMDYN_GPU_WAIT_SECONDS": "0.5"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode != 0 and 0.4 < time.monotonic() - t0 < 10
    assert "GpuLeaseError: no free GPU after 0.5 s: all of 0,1 are leased" in r.stderr


def test_a_chosen_device_is_respected(env, holders):
    assert holders(env, 0, CUDA_VISIBLE_DEVICES="3").leased() == ("None", "3")


def test_one_or_no_device_sets_nothing(env, holders):
    assert holders(env, 0, PARAMDYN_NUM_GPUS="1").leased() == ("None", "<unset>")
    assert holders(env, 0, PARAMDYN_NUM_GPUS="0").leased() == ("None", "<unset>")


def test_leases_among_the_listed_devices(env, holders):
    a = holders(env, 30, CUDA_VISIBLE_DEVICES="2,5")
    b = holders(env, 30, CUDA_VISIBLE_DEVICES="2,5")
    assert {a.leased(), b.leased()} == {("2", "2"), ("5", "5")}


def test_the_lease_lasts_for_the_process(env, monkeypatch):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # restored after the test,
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")  # with the lease's setting undone
    monkeypatch.setattr(gpus, "_lease", None)
    first = gpus.lease_gpu()
    assert first == 0 and os.environ["CUDA_VISIBLE_DEVICES"] == "0"
    assert gpus.lease_gpu() == 0  # the same lease, not a second GPU
    # another process sees GPU 0 taken
    r = subprocess.run(
        [sys.executable, "-c", HOLDER, "0"], env=env, capture_output=True, text=True, timeout=30
    )
    assert r.stdout.split() == ["1", "1"]
    _, fd = gpus._lease
    os.close(fd)  # give it back, for the other tests of this process


def test_counts_gpus_with_nvidia_smi(tmp_path, monkeypatch):
    smi = tmp_path / "nvidia-smi"
    smi.write_text(
        "#!/bin/sh\n"
        "echo 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-aaaa)'\n"
        "echo '  MIG 1g.10gb     Device  0: (UUID: MIG-bbbb)'\n"
        "echo 'GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-cccc)'\n"
        "echo 'GPU 2: NVIDIA H100 80GB HBM3 (UUID: GPU-dddd)'\n"
    )
    smi.chmod(0o755)
    monkeypatch.delenv("PARAMDYN_NUM_GPUS", raising=False)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert gpus.num_gpus() == 3
    monkeypatch.setenv("PARAMDYN_NUM_GPUS", "5")
    assert gpus.num_gpus() == 5


def test_default_lock_dir_is_per_user(monkeypatch):
    monkeypatch.delenv("PARAMDYN_GPU_LOCK_DIR", raising=False)
    assert gpus.lock_dir().name == f"paramdyn-gpu-locks-{os.getuid()}"
    monkeypatch.setenv("PARAMDYN_GPU_LOCK_DIR", "/x/y")
    assert gpus.lock_dir() == Path("/x/y")


def test_no_torch_at_import():
    code = "import sys, paramdyn.gpus; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)

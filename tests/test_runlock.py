"""The directory lock of ``paramdyn.runlock``: a killed run's Snakemake locks are cleared on
the rerun, a live run's never.

The end-to-end tests run a ``make demo``-like target (make -> sh -> the lock -> the real
snakemake CLI -> its jobs) on the tiny study's two runs in a temporary directory, up to the
training jobs (``--until train``: the locks are the same, the test shorter), in a process
group of its own, as a terminal runs it; "killed" is SIGKILL to the whole group
(what a power cut or a preempted node does to every process at once).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from paramdyn import runlock

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RUNS = [f"resnet18-basic-{s}-even_synthetic_kaiming-normal_sgd_s0" for s in ("residual", "plain")]

# the repo Makefile's demo recipe, on the tiny study (the same lock, the same snakemake)
MAKEFILE = """\
demo:
\t{python} -m paramdyn.runlock -- {snakemake} -s {snakefile} --directory {work} \
--configfile {config} --cores 2 --rerun-incomplete --until train
"""


@pytest.fixture
def work(tmp_path, tiny_two_runs) -> Path:
    """A workdir with the tiny study's two runs (longer training, so a kill lands in it) and
    a Makefile whose `demo` runs it under the lock."""
    cfg = tiny_two_runs
    cfg["studies"]["tiny"].update(epochs=12, checkpoint={"every_epochs": 6})
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "Makefile").write_text(
        MAKEFILE.format(
            python=sys.executable,
            snakemake=BIN / "snakemake",
            snakefile=REPO / "Snakefile",
            work=tmp_path,
            config=tmp_path / "tiny.yaml",
        )
    )
    return tmp_path


def start_demo(work: Path) -> subprocess.Popen:
    """`make demo` in a process group of its own (as a shell starts it)."""
    return subprocess.Popen(
        ["make", "--no-print-directory", "demo"],
        cwd=work,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def wait_for_training(work: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Until a training job has started (its work directory holds its key) and Snakemake's
    locks are written."""
    keys = [work / "results" / ".work" / "tiny" / r / "key" for r in RUNS]
    deadline = time.monotonic() + timeout
    while not (any(k.exists() for k in keys) and runlock.snakemake_locks(work)):
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "training never started"
        time.sleep(0.05)


def lock_state(work: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in runlock.snakemake_locks(work)}


def finish(proc: subprocess.Popen, timeout: float = 900) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def assert_complete(work: Path) -> None:
    study = work / "results" / "tiny"
    for r in RUNS:
        assert (study / "runs" / r / "run.json").is_file()
    assert not runlock.snakemake_locks(work)


def test_rerun_after_the_process_group_is_killed(work):
    proc = start_demo(work)
    wait_for_training(work, proc)
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(0.5)  # the rest of the group is reaped by init
    stale = lock_state(work)
    assert stale, "the kill left no Snakemake lock: nothing tested"
    # without the lock, the rerun stops (the issue)
    plain = subprocess.run(
        [BIN / "snakemake", "-s", REPO / "Snakefile", "--directory", work,
         "--configfile", work / "tiny.yaml", "--cores", "2", "--rerun-incomplete",
         "--until", "train"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert plain.returncode != 0
    assert "power loss" in plain.stdout + plain.stderr
    assert lock_state(work) == stale
    # the same command again: the dead run's locks are cleared, the run completes
    out = finish(start_demo(work))
    assert "no longer alive" in out and "unlocking" in out
    assert_complete(work)


def test_a_second_run_is_refused_while_the_first_lives(work):
    first = start_demo(work)
    wait_for_training(work, first)
    held = lock_state(work)
    second = start_demo(work)
    out, _ = second.communicate(timeout=300)
    assert second.returncode != 0
    assert f"exit {runlock.BUSY}" in out or f"Error {runlock.BUSY}" in out, out
    assert "another run is alive" in out, out
    assert first.poll() is None, "the first run ended before the second was refused"
    assert lock_state(work) == held  # the first run's locks are untouched
    out = finish(first)
    assert "unlocking" not in out
    assert_complete(work)


def test_the_repo_demo_runs_snakemake_under_the_lock():
    dry = subprocess.run(
        ["make", "-n", "--no-print-directory", "demo"],
        cwd=REPO, capture_output=True, text=True, check=True,
    )  # fmt: skip
    lines = dry.stdout.splitlines()
    calls = [line for line in lines if any(Path(t).name == "snakemake" for t in line.split())]
    assert len(calls) == 2, dry.stdout
    assert all(line.split()[0].endswith("bin/paramdyn") for line in calls), calls


@pytest.fixture
def fake_snakemake(tmp_path):
    """A process named snakemake, started by hand in ``tmp_path`` (not through the lock)."""
    exe = tmp_path / "bin" / "snakemake"
    exe.parent.mkdir()
    exe.write_text(f"#!{sys.executable}\nimport time\ntime.sleep(60)\n")
    exe.chmod(0o755)
    proc = subprocess.Popen([exe], cwd=tmp_path)
    deadline = time.monotonic() + 30
    while proc.pid not in runlock.live_snakemake(tmp_path.resolve()):
        assert time.monotonic() < deadline, "the fake snakemake never showed in /proc"
        time.sleep(0.05)
    yield proc
    proc.kill()
    proc.wait()


def write_locks(work: Path) -> dict[str, str]:
    locks = work / ".snakemake" / "locks"
    locks.mkdir(parents=True)
    (locks / "0.input.lock").write_text(f"{work}/a\n")
    (locks / "0.output.lock").write_text(f"{work}/b\n")
    return lock_state(work)


@pytest.mark.skipif(not Path("/proc/self/cwd").exists(), reason="needs Linux /proc")
def test_locks_of_a_snakemake_started_by_hand_are_left_alone(tmp_path, fake_snakemake, capsys):
    before = write_locks(tmp_path)
    unlocker = tmp_path / "unlock-called"
    # a "snakemake" that would record any call (the unlock): it must not be called
    cmd = [sys.executable, "-c", f"open({str(unlocker)!r}, 'w')", "--directory", str(tmp_path)]
    fd = runlock.prepare(cmd)
    os.close(fd)
    assert not unlocker.exists()
    assert lock_state(tmp_path) == before
    assert str(fake_snakemake.pid) in capsys.readouterr().err


def test_the_lock_is_exclusive_and_dies_with_its_holder(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from pathlib import Path; from paramdyn import runlock; "
         "runlock.acquire(Path(sys.argv[1]), ['holder']); print('held', flush=True); "
         "time.sleep(60)", str(tmp_path)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(runlock.Busy, match=f"pid {holder.pid}"):
        runlock.acquire(tmp_path, ["second"])
    holder.kill()
    holder.wait()
    os.close(runlock.acquire(tmp_path, ["third"]))  # the kernel dropped the dead one's lock


def test_unlock_command_keeps_the_workflow_options():
    cmd = ["snakemake", "--cores", "2", "-s", "S", "--directory", "W", "--configfiles", "a",
           "b", "--config", "run=[x,y]", "variant=demo", "--report", "r.html",
           "--profile", "profiles/local"]  # fmt: skip
    assert runlock.unlock_command(cmd) == [
        "snakemake", "--snakefile", "S", "--directory", "W", "--profile", "profiles/local",
        "--configfiles", "a", "b", "--config", "run=[x,y]", "variant=demo", "--unlock",
    ]  # fmt: skip
    py = [sys.executable, "-m", "snakemake", "--cores", "1", "-d", "W", "-C", "a=1"]
    assert runlock.unlock_command(py) == [*py[:3], "--directory", "W", "--config", "a=1",
                                          "--unlock"]  # fmt: skip
    assert runlock.workdir_of(["-d", "/tmp/x", "--cores", "1"]) == Path("/tmp/x").resolve()
    assert runlock.workdir_of(["--cores", "1"]) == Path.cwd()


def test_without_flock_the_command_runs_and_nothing_is_unlocked(tmp_path):
    before = write_locks(tmp_path)
    script = (
        "import errno, fcntl, sys\n"
        "def no_flock(*a): raise OSError(errno.ENOLCK, 'No locks available')\n"
        "fcntl.flock = no_flock\n"
        "from paramdyn import runlock\n"
        "sys.exit(runlock.main(['--', 'echo', 'ran', '--directory', sys.argv[1]]))\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ran") and "cannot lock" in r.stderr
    assert lock_state(tmp_path) == before

"""Run a Snakemake command under a lock that the kernel releases when the run dies.

    python -m paramdyn.runlock -- SNAKEMAKE [ARGS ...]
    paramdyn snakemake [ARGS ...]             (the same, with this environment's snakemake)

(SNAKEMAKE: ``snakemake``, a path to it, or ``python -m snakemake``.)

Snakemake marks the files a run uses in ``<workdir>/.snakemake/locks/`` and removes the
marks when it exits; a run killed with SIGKILL (a killed ``make demo``, a preempted node, a
power cut) leaves them behind, and the next run stops with "the remaining lock was likely
caused by a kill signal or a power loss". Those files cannot tell a dead run from a live
one, and ``snakemake --unlock`` removes every run's marks.

So every run started here first takes ``<workdir>/.snakemake/paramdyn.lock`` with
``flock`` (non-blocking). The kernel drops that lock when the last process holding it
exits, however it exits. Then:

- the lock is held by another process: another run started here is alive in this
  directory; nothing is touched and the command is refused (exit status 75, naming it);
- it is ours and ``.snakemake/locks/`` holds marks: no run started here is alive, so they
  are a dead run's, unless a ``snakemake`` started by hand runs in this directory
  (looked for in ``/proc``: the current user's processes on this host whose working
  directory is the workdir); if none does, ``SNAKEMAKE --unlock`` runs with the
  command's Snakefile, directory, config and profile options, and the marks are gone;
  if one does, the marks stay and Snakemake decides as usual.

Then the command replaces this process (``exec``) with the lock's descriptor kept open,
so the lock lives exactly as long as the Snakemake process. On a file system without
``flock`` the command runs as it is, and nothing is unlocked.
The workdir is the command's ``-d/--directory``, else the current directory.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path

LOCK_FILE = "paramdyn.lock"  # inside <workdir>/.snakemake
BUSY = 75  # EX_TEMPFAIL: another live run uses the directory; try again later


class NoLock(Exception):
    """The file system of the workdir offers no ``flock`` (some network file systems)."""


class Busy(Exception):
    """Another live process holds the directory's lock."""

    def __init__(self, path: Path, holder: str):
        super().__init__(f"{path} is held by {holder or 'another process'}")
        self.path, self.holder = path, holder


def _options() -> argparse.ArgumentParser:
    """The Snakemake options that say which workflow and directory a command is about
    (spelled as Snakemake spells them; abbreviations are not recognised)."""
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    p.add_argument("-s", "--snakefile")
    p.add_argument("-d", "--directory")
    p.add_argument("--configfile", "--configfiles", nargs="+")
    p.add_argument("-C", "--config", nargs="*")
    p.add_argument("--profile")
    p.add_argument("--workflow-profile")
    p.add_argument("--replace-workflow-config", action="store_true")
    return p


def split_program(command: list[str]) -> tuple[list[str], list[str]]:
    """The program (``snakemake``, ``/path/snakemake``, ``python -m snakemake``) and
    Snakemake's arguments."""
    for i, word in enumerate(command[:3]):
        if Path(word).name == "snakemake":
            return command[: i + 1], command[i + 1 :]
    return command[:1], command[1:]


def workdir_of(args: list[str]) -> Path:
    """The working directory of a Snakemake command's arguments (without the program)."""
    known, _ = _options().parse_known_args(args)
    return Path(known.directory or ".").resolve()


def unlock_command(command: list[str]) -> list[str]:
    """``snakemake --unlock`` for the same workflow, directory, config and profile."""
    program, args = split_program(command)
    known, _ = _options().parse_known_args(args)
    out = list(program)
    for flag, value in (
        ("--snakefile", known.snakefile),
        ("--directory", known.directory),
        ("--profile", known.profile),
        ("--workflow-profile", known.workflow_profile),
    ):
        if value is not None:
            out += [flag, value]
    if known.configfile:
        out += ["--configfiles", *known.configfile]
    if known.config:
        out += ["--config", *known.config]
    if known.replace_workflow_config:
        out.append("--replace-workflow-config")
    return [*out, "--unlock"]


def acquire(workdir: Path, command: list[str]) -> int:
    """Take ``<workdir>/.snakemake/paramdyn.lock`` without waiting; the descriptor that
    holds it. Raises :class:`Busy` (naming the holder) when a live process holds it, and
    :class:`NoLock` when the file system cannot lock it."""
    path = workdir / ".snakemake" / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        os.close(fd)
        raise Busy(path, holder) from None
    except OSError as e:  # ENOLCK, EOPNOTSUPP, ...: no flock on this file system
        os.close(fd)
        raise NoLock(f"{path}: {e.strerror}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()}: {' '.join(command)}\n".encode(), 0)
    return fd


def snakemake_locks(workdir: Path) -> list[Path]:
    """The lock files Snakemake keeps in the directory (a live run's, or a dead one's)."""
    return sorted((workdir / ".snakemake" / "locks").glob("*.lock"))


def _ancestors() -> set[int]:
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        pid = int(stat.rsplit(")", 1)[1].split()[1])  # the field after the name: ppid
    return pids


def live_snakemake(workdir: Path) -> list[int]:
    """Snakemake processes (and the jobs they run) of this user on this host whose working
    directory is ``workdir`` (Linux ``/proc``; empty elsewhere). This process, its parents and other
    ``paramdyn.runlock`` callers (refused while the lock is held) are left out."""
    proc = Path("/proc")
    if not proc.is_dir():
        return []
    skip, found = _ancestors(), []
    scripts = str(workdir / ".snakemake" / "scripts") + os.sep
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) in skip:
            continue
        try:
            if Path(os.readlink(entry / "cwd")).resolve() != workdir:
                continue
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:  # gone, or another user's
            continue
        if any("paramdyn.runlock" in a for a in argv) or any(
            Path(a).name == "paramdyn" for a in argv[:2]
        ):
            continue
        # snakemake itself, or a job it started (scripts run from .snakemake/scripts/)
        if any(Path(a).name == "snakemake" or a.startswith(scripts) for a in argv):
            found.append(int(entry.name))
    return sorted(found)


def say(message: str) -> None:
    print(f"paramdyn.runlock: {message}", file=sys.stderr, flush=True)


def prepare(command: list[str]) -> int:
    """Take the lock and clear a dead run's Snakemake locks; the lock's descriptor.
    Raises :class:`Busy`, or ``subprocess.CalledProcessError`` when the unlock fails."""
    workdir = workdir_of(split_program(command)[1])
    fd = acquire(workdir, command)
    stale = snakemake_locks(workdir)
    if stale:
        alive = live_snakemake(workdir)
        if alive:
            say(
                f"{workdir} holds Snakemake locks and snakemake process(es) "
                f"{', '.join(map(str, alive))} run there, not through this lock: "
                "leaving the locks alone"
            )
        else:
            say(
                f"{workdir} holds Snakemake locks ({', '.join(p.name for p in stale)}) of a "
                "run that is no longer alive (killed, or a power cut): unlocking it"
            )
            subprocess.run(unlock_command(command), check=True, stdout=sys.stderr)
    return fd


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv or argv[0].startswith("-"):
        say("usage: python -m paramdyn.runlock -- SNAKEMAKE [ARGS ...]")
        return 2
    exe = shutil.which(argv[0])
    if exe is None:
        say(f"no program {argv[0]!r}")
        return 127
    try:
        fd = prepare(argv)
    except Busy as e:
        say(
            f"another run is alive in {e.path.parent.parent} ({e.holder}); refusing to "
            "start a second one there, and leaving its locks alone. Wait for it to end "
            "(or stop it), then run this command again."
        )
        return BUSY
    except subprocess.CalledProcessError as e:
        say(f"the unlock ({' '.join(e.cmd)}) failed with exit status {e.returncode}")
        return e.returncode or 1
    except NoLock as e:
        say(f"cannot lock ({e}): running the command as it is, unlocking nothing")
        fd = None
    if fd is not None:
        os.set_inheritable(fd, True)  # held by the command itself from here on
    os.execv(exe, argv)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())

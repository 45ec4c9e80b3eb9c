"""The run folder guard: one run per folder at a time, and nothing of an earlier run lost
(docs/runs.md).

Every run of `run.py` goes through it, in three steps:

    open     before anything of the run is written there (a Hydra callback, before Hydra
             saves `.hydra/`): take the folder's lock, remove temporaries an interrupted
             write left, and refuse a folder holding an earlier run's outputs unless
             `overwrite=true`, which moves them to `previous/<timestamp>/`
    start    the run's checks passed (`start()`, called by each task): from here a
             failure leaves the marker `FAILED` holding the error
    close    success: an earlier `FAILED` goes (a resumed training succeeded); failure
             after the start: `FAILED`; a run refused before its start puts back what
             `open` moved aside, so the folder is as it was

A training resumed in its own folder (`ckpt_path=last`, or a checkpoint inside the
folder) continues the earlier run there: nothing is refused or moved; so does a
`task=sensitivity` run in a folder holding its sensitivity.csv (without overwrite=true),
which skips the units measured there with the same configuration, a `task=search`
run in a folder holding its search.db, which continues the study, and a `task=eval` run
in the folder of an interrupted evaluation (its `.fid_chunks/`), which continues from the
first chunk not scored yet.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import sys
import time
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from jit.atomic import atomic_write_text, check_writable, remove_stale_temporaries, write_error

__all__ = ["FAILED", "LOCK", "PREVIOUS", "RunFolder", "RunFolderError", "RunFolderGuard", "current", "open_run",
           "start"]

FAILED = "FAILED"
LOCK = ".lock"
PREVIOUS = "previous"

# What runs of this project write into their folder (besides `previous/` and the lock);
# a folder holding any of these holds an earlier run. Files of the user stay where they are.
RUN_ARTEFACTS = (
    ".hydra", ".pl_hydra_*", FAILED, "failed.json", "results.json", "layer_stats.csv", "calibration.pt",
    "coverage.csv", "sample_grid.png", "samples.npz", "samples", ".samples.rank*.u8", "baseline_fp",
    "checkpoints", "checkpoint-last.pth", "finetune_comparison.json", "compare", "csv", "tensorboard", "wandb",
    ".fid_chunks", "sensitivity.csv", "sensitivity.json", "sensitivity.png", "units",
    "search.db", "search.json", "pareto.csv", "pareto.png", "trials", "calibration_cache", "presets",
    # a sweep's folder
    ".sweep_id", "multirun.yaml", "summary.csv", "summary.md", "summary_*.png",
)


class RunFolderError(ValueError):
    """The folder is in use by another run, or holds an earlier run; one line."""


# ----------------------------------------------------------------------------- lock
def _process_start(pid: int) -> str | None:
    """The start time of process `pid` (Linux), so a pid reused by another process is not
    taken for the run that held the lock."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(owner: dict) -> bool:
    if owner.get("host") != socket.gethostname():
        return True  # another machine's process: it cannot be checked from here
    pid = owner.get("pid")
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, run by another user
    started = owner.get("process_start")
    return started is None or _process_start(pid) in (None, started)


def _read_owner(lock: Path) -> dict | None:
    try:
        owner = json.loads(lock.read_text())
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def _acquire(folder: Path) -> Path:
    """Create `folder/.lock` naming this process; take over a lock whose process is gone."""
    lock = folder / LOCK
    me = {"pid": os.getpid(), "host": socket.gethostname(), "process_start": _process_start(os.getpid()),
          "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(10):
        tmp = folder / f".lock.{os.getpid()}.tmp"
        try:
            tmp.write_text(json.dumps(me))
            try:
                os.link(tmp, lock)  # atomic: the lock appears with its content, or not at all
                return lock
            except FileExistsError:
                pass
            finally:
                tmp.unlink(missing_ok=True)
        except OSError as err:
            raise write_error(err, folder, any_errno=True) from err
        owner = _read_owner(lock)
        if owner is not None and _alive(owner):
            where = f"pid {owner.get('pid')}" + (f" on {owner['host']}" if owner.get("host") != me["host"] else "")
            raise RunFolderError(
                f"{folder}: another run ({where}, started {owner.get('started')}) is writing to this folder; "
                f"wait for it or choose another folder (hydra.run.dir=...); if that run is gone, delete {lock}")
        # Stale: its process ended without releasing it (SIGKILL, power loss). Renaming it
        # away first makes sure only one of two runs taking it over wins.
        stale = folder / f".lock.stale.{os.getpid()}"
        try:
            os.rename(lock, stale)
            stale.unlink()
        except FileNotFoundError:
            continue
        except OSError as err:
            raise write_error(err, folder, any_errno=True) from err
    raise RunFolderError(f"{folder}: could not take the lock {lock}")


# ------------------------------------------------------------------------ the guard
def _entries(folder: Path, ignore: set[Path]) -> list[Path]:
    """The earlier run's outputs in `folder`; files in `ignore`, and folders holding only
    such files, left out."""
    def ignored(path: Path) -> bool:
        if path.is_dir() and not path.is_symlink():
            return all(p.resolve() in ignore for p in path.rglob("*") if not p.is_dir())
        return path.resolve() in ignore

    found = [p for pattern in RUN_ARTEFACTS for p in folder.glob(pattern)]
    found += [p for p in folder.iterdir() if p.name.isdigit() and (p / ".hydra").is_dir()]  # a sweep's jobs
    if (folder / "run.log").is_file():  # Hydra's job log (hydra.job.name is run)
        found.append(folder / "run.log")
    return sorted({p for p in found if not ignored(p)})


def _holds(path: Path, inputs: set[Path]) -> bool:
    """Whether `path` is, or is a folder holding, one of `inputs`."""
    path = path.resolve()
    return any(i == path or path in i.parents for i in inputs)


class RunFolder:
    def __init__(self, path: Path):
        self.path = path
        self.started = False
        self.previous: Path | None = None  # where `open` moved the earlier run
        self.moved: list[str] = []
        self.lock: Path | None = None

    @classmethod
    def open(cls, path: str | os.PathLike, *, overwrite: bool, inputs: set[Path] = frozenset(),
             continuing: bool = False, ignore: set[Path] = frozenset()) -> RunFolder:
        """Lock `path` for this run; an earlier run there is refused, or with `overwrite`
        moved to previous/<timestamp>/ (except the files this run reads, `inputs`).
        `continuing`: this run continues the folder's run (a resumed training).
        `ignore`: files this run has written there already."""
        folder = cls(Path(path))
        check_writable(folder.path)
        folder.lock = _acquire(folder.path)
        atexit.register(folder.release)
        try:
            remove_stale_temporaries(folder.path)
            earlier = [] if continuing else _entries(folder.path, {p.resolve() for p in ignore})
            if earlier and not overwrite:
                names = ", ".join(p.name for p in earlier[:4]) + (", ..." if len(earlier) > 4 else "")
                raise RunFolderError(
                    f"{folder.path} holds the outputs of an earlier run ({names}); choose another folder "
                    f"(hydra.run.dir=..., hydra.sweep.dir=...), or pass overwrite=true to move them to "
                    f"{folder.path / PREVIOUS}/<timestamp>/")
            folder._move_aside([p for p in earlier if not _holds(p, inputs)])
        except BaseException:
            folder.release()
            raise
        return folder

    def _move_aside(self, entries: list[Path]) -> None:
        if not entries:
            return
        stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
        target, n = self.path / PREVIOUS / stamp, 1
        while target.exists():
            n += 1
            target = self.path / PREVIOUS / f"{stamp}_{n}"
        try:
            target.mkdir(parents=True)
            self.previous = target
            for entry in entries:
                os.rename(entry, target / entry.name)
                self.moved.append(entry.name)
        except OSError as err:
            self.restore()
            raise write_error(err, self.path, any_errno=True) from err

    def start(self) -> None:
        if self.previous is not None and not self.started:
            print(f"overwrite=true: the earlier run in {self.path} is now in {self.previous}", file=sys.stderr)
        self.started = True

    def restore(self) -> None:
        """Put back what `open` moved aside (a run refused before it started); what cannot
        go back (its name taken meanwhile) stays in previous/."""
        if self.previous is None:
            return
        for name in self.moved:
            if not (self.path / name).exists():
                try:
                    os.rename(self.previous / name, self.path / name)
                except OSError:
                    pass
        for folder in (self.previous, self.previous.parent):
            try:
                folder.rmdir()  # only when empty
            except OSError:
                pass
        self.previous, self.moved = None, []

    def succeed(self) -> None:
        (self.path / FAILED).unlink(missing_ok=True)  # of an earlier attempt this run continued
        self.release()

    def fail(self, text: str) -> str | None:
        """Write FAILED holding `text`; the reason it could not be written, or None."""
        try:
            atomic_write_text(self.path / FAILED, text.rstrip("\n") + "\n")
        except OSError as err:
            return os.strerror(err.errno).lower() if err.errno else str(err)
        finally:
            self.release()
        return None

    def release(self) -> None:
        lock, self.lock = self.lock, None
        if lock is None:
            return
        atexit.unregister(self.release)
        owner = _read_owner(lock)
        if owner is not None and owner.get("pid") == os.getpid():
            try:
                lock.unlink()
            except OSError:
                pass  # a folder made read-only: the lock stays, and is stale once this process ends


_current: RunFolder | None = None


def open_run(path: str | os.PathLike, **kwargs) -> RunFolder:
    global _current
    _current = RunFolder.open(path, **kwargs)
    return _current


def current(path: str | os.PathLike) -> RunFolder | None:
    """The guard opened for `path` in this process, if any."""
    if _current is not None and _current.lock is not None and Path(path).resolve() == _current.path.resolve():
        return _current
    return None


def start() -> None:
    """The checks of the running task passed: from here a failure leaves FAILED."""
    if _current is not None:
        _current.start()


# ---------------------------------------------------------------- from the config
def config_inputs(cfg: DictConfig) -> set[Path]:
    """Every literal string of the run config read as a path: files the run may read."""
    plain = OmegaConf.to_container(cfg, resolve=False, enum_to_str=True)
    plain.pop("hydra", None)
    found: set[Path] = set()

    def walk(node):
        if isinstance(node, dict):
            for value in node.values():
                walk(value)
        elif isinstance(node, (list, tuple)):
            for value in node:
                walk(value)
        elif isinstance(node, str) and node and "${" not in node:
            try:
                found.add(Path(node).expanduser().resolve())
            except (OSError, RuntimeError, ValueError):
                pass

    walk(plain)
    return found


def continues_training(cfg: DictConfig, folder: Path) -> bool:
    """A training resumed from its own folder's checkpoints continues the run there."""
    ckpt = cfg.get("ckpt_path")
    if str(cfg.get("task")) != "train" or ckpt is None:
        return False
    return ckpt == "last" or folder.resolve() in Path(ckpt).expanduser().resolve().parents


def continues_sensitivity(cfg: DictConfig, folder: Path) -> bool:
    """A sensitivity analysis rerun in its folder resumes it (jit/sensitivity.py refuses a
    table of another configuration); overwrite=true starts afresh."""
    return (str(cfg.get("task")) == "sensitivity" and not cfg.get("overwrite", False)
            and (folder / "sensitivity.csv").is_file())


def continues_search(cfg: DictConfig, folder: Path) -> bool:
    """A search rerun in its folder continues its study (jit/search.py refuses a
    search.db of another search space); overwrite=true starts afresh."""
    return (str(cfg.get("task")) == "search" and not cfg.get("overwrite", False)
            and (folder / "search.db").is_file())


def continues_evaluation(cfg: DictConfig, folder: Path) -> bool:
    """An evaluation rerun in the folder of an interrupted one continues it: its scored
    chunks are there (jit/evaluation/chunks.py); overwrite=true starts afresh."""
    return (str(cfg.get("task")) == "eval" and not cfg.get("overwrite", False)
            and any((where / ".fid_chunks").is_dir() for where in (folder, folder / "baseline_fp")))


def open_for(cfg: DictConfig, folder: Path, ignore: set[Path] = frozenset(), sweep_job: bool = False) -> RunFolder:
    """The guard of a run of `cfg` in `folder`. `sweep_job`: a job folder of a sweep,
    whose folder the sweep's guard has cleared."""
    continuing = (sweep_job or continues_training(cfg, folder) or continues_sensitivity(cfg, folder)
                  or continues_search(cfg, folder) or continues_evaluation(cfg, folder))
    return open_run(folder, overwrite=bool(cfg.get("overwrite", False)), inputs=config_inputs(cfg),
                    continuing=continuing, ignore=ignore)


def first_rank() -> bool:
    """DDP ranks after the first start the same run: the first one guards the folder."""
    from lightning.pytorch.utilities import rank_zero_only

    return rank_zero_only.rank == 0


def _refuse(err: Exception) -> None:
    print(f"error: {err}", file=sys.stderr)
    raise SystemExit(2)


class RunFolderGuard(Callback):
    """Opens the guard before Hydra writes into the run folder (`.hydra/`, the job log):
    so a refused run leaves the earlier run's files as they were. A sweep's folder is
    guarded as a whole (one lock, the earlier sweep moved aside with overwrite=true)."""

    def __init__(self):
        self.sweep: RunFolder | None = None

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        if not first_rank():
            return
        try:
            open_for(config, Path(OmegaConf.select(config, "hydra.run.dir")))
        except (RunFolderError, OSError) as err:
            _refuse(err)

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        try:
            self.sweep = RunFolder.open(Path(OmegaConf.select(config, "hydra.sweep.dir")),
                                        overwrite=bool(config.get("overwrite", False)),
                                        inputs=config_inputs(config))
        except (RunFolderError, OSError) as err:
            _refuse(err)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        if self.sweep is not None:
            self.sweep.release()


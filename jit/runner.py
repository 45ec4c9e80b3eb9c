"""The entry point behind `run.py`: guard the run folder (jit/run_folder.py), dispatch the
task, and turn a user error into one line on stderr with its exit code, leaving the run
folder as docs/runs.md says."""

from __future__ import annotations

import contextlib
import signal
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from jit.builders import finish_wandb
from jit.checkpoint import CheckpointError
from jit.config import ConfigError, Task, sweep_group
from jit.tasks import dispatch


def _user_error_types() -> tuple[type, ...]:
    """Errors that mean bad input (config, paths, files): one line, no traceback wall."""
    from jit.datamodules import CorruptImageError
    from jit.metrics.features import FeatureExtractorError

    return (ConfigError, CheckpointError, ValueError, KeyError, FileNotFoundError, NotADirectoryError,
            PermissionError, CorruptImageError, FeatureExtractorError)


def _files_hydra_wrote(run_dir: Path) -> list[Path]:
    """What Hydra put into the run folder for this job: the saved config (rewritten for every
    job) and the job log, unless that log already held lines of an earlier run."""
    from hydra.core.hydra_config import HydraConfig

    try:
        hc = HydraConfig.get()
    except ValueError:  # called without Hydra (tests, scripts)
        return []
    files = []
    if hc.output_subdir is not None:
        files += [run_dir / hc.output_subdir / name for name in ("config.yaml", "hydra.yaml", "overrides.yaml")]
    log = OmegaConf.select(hc, "job_logging.handlers.file.filename", default=None)
    if log and Path(log).is_file() and Path(log).stat().st_size == 0:
        files.append(Path(log))
    return files


def _remove_files_of_failed_run(run_dir: Path, created: list[Path]) -> None:
    """Delete what this run created, then the folders that are left empty; nothing else."""
    for path in created:
        try:
            path.unlink(missing_ok=True)
        except OSError:  # a folder made read-only: what cannot go stays
            pass
    for folder in sorted({p.parent for p in created} | {run_dir}, key=lambda p: len(p.parts), reverse=True):
        try:
            folder.rmdir()  # only succeeds when empty
        except OSError:
            pass


def _one_line_error(err: BaseException, run_dir: Path) -> str | None:
    """The message of bad input, a full disk or an unwritable path; None for anything else."""
    from jit.atomic import OutputWriteError, write_error

    # PermissionError may come from reading an input: its own message names the file.
    if isinstance(err, OSError) and not isinstance(err, PermissionError):
        mapped = write_error(err, err.filename or run_dir)
        if isinstance(mapped, OutputWriteError):
            return str(mapped)
    if isinstance(err, _user_error_types()):
        return str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    return None


def _exit_code(err: BaseException) -> int | None:
    """The exit code of a run stopped by a signal or by sys.exit; None for other errors."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from jit.interrupt import RunInterrupted

    if isinstance(err, RunInterrupted):
        return err.exit_code
    if isinstance(err, KeyboardInterrupt):
        return 128 + signal.SIGINT
    if isinstance(err, SIGTERMException):  # a training that saved last.ckpt (jit.tasks.train)
        return 128 + signal.SIGTERM
    if isinstance(err, SystemExit):
        return err.code if isinstance(err.code, int) else (0 if err.code is None else 1)
    return None


def _stop_reason(code: int) -> str:
    if code > 128:
        try:
            return f"interrupted by {signal.Signals(code - 128).name} (exit code {code})"
        except ValueError:
            pass
    return f"stopped with exit code {code}"


def main(cfg: DictConfig):
    """Run one job in its run folder (jit/run_folder.py, docs/runs.md).

    Bad input, a full disk or an unwritable path end the run with one clear line and exit
    code 2; a stop signal with 128 + its number (143 SIGTERM, 130 SIGINT); any other error
    with its traceback. A run refused before its checks passed deletes only the files Hydra
    created for it and puts back what overwrite=true moved aside; a run that started leaves
    the marker FAILED holding the error. In a multirun a failing job, whatever the
    exception, records FAILED in its folder and returns, so the other jobs carry on; the
    sweep summary lists it and the multirun exits non-zero (jit.sweep).
    """
    from jit import run_folder
    from jit.console import quiet_dependencies
    from jit.interrupt import stop_on_signals

    quiet_dependencies()
    run_dir = Path(cfg.paths.output_dir)
    multirun = sweep_group(cfg) is not None
    created = _files_hydra_wrote(run_dir)
    folder = None
    try:
        folder = run_folder.current(run_dir)
        if folder is None and run_folder.first_rank():  # not opened by the Hydra callback (a sweep job)
            folder = run_folder.open_for(cfg, run_dir, ignore=set(created), sweep_job=multirun)
        if multirun:
            from jit.sweep import mark_sweep_job

            mark_sweep_job(run_dir)
        # Training keeps Lightning's signal handling (SIGTERM saves last.ckpt; jit/train.py).
        with stop_on_signals() if cfg.task != Task.train else contextlib.nullcontext():
            result = dispatch(cfg)
    except BaseException as err:
        finish_wandb(1)  # a crashed job must not leave its run open for the next job of a sweep
        if _end_failed(err, folder, run_dir, created, multirun):
            return None  # a failed sweep job: the sweep carries on
        raise
    if folder is not None:
        folder.succeed()
    return result


def _end_failed(err: BaseException, folder, run_dir: Path, created: list[Path], multirun: bool) -> bool:
    """Report `err` and leave the run folder as `main` says; returns (True) only for a sweep
    job that failed (not stopped), which the sweep survives."""
    import logging
    import traceback

    from jit.run_folder import FAILED

    code = _exit_code(err)
    if code == 0:  # sys.exit(0): a success
        if folder is not None:
            folder.succeed()
        raise err
    message = _one_line_error(err, run_dir) if code is None else _stop_reason(code)
    trace = "".join(traceback.format_exception(err)) if code is None else ""
    if trace:
        logging.getLogger("jit").debug(trace)
    if folder is None or not (folder.started or multirun):
        # Refused before it started: the folder goes back to what it was.
        if not multirun:
            _remove_files_of_failed_run(run_dir, created)
        if folder is not None:
            folder.restore()
            folder.release()
            _remove_files_of_failed_run(run_dir, [])  # the folder, if the lock was all it held
        if isinstance(err, SystemExit) or message is None:
            raise err
        if code is not None:  # a stop signal
            print(message, file=sys.stderr)
            sys.exit(code)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    shown = message if message is not None else f"{type(err).__name__}: {' '.join(str(err).split())}"
    if multirun and message is None:  # not bad input: keep the traceback for the user
        print(trace, file=sys.stderr)
    unwritten = folder.fail(shown + (f"\n\n{trace}" if message is None else ""))
    note = f"; the marker {run_dir / FAILED} could not be written ({unwritten})" if unwritten else ""
    if code is not None:  # a stop signal: the sweep stops too
        if note or not isinstance(err, SystemExit):  # sys.exit's caller has said why
            print(f"{shown}{note}", file=sys.stderr)
        sys.exit(code)
    if multirun:
        print(f"job failed: {shown}{note}", file=sys.stderr)
        return True
    if message is None:
        if note:
            print(note.lstrip("; "), file=sys.stderr)
        raise err
    print(f"error: {message}{note}", file=sys.stderr)
    sys.exit(2)

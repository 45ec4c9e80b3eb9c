"""The entry point behind `run.py`: prepare the run directory, dispatch the task, and turn
a user error into one line on stderr with its exit code, removing what a failed run
created and nothing else."""

from __future__ import annotations

import sys
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from jit.builders import finish_wandb
from jit.checkpoint import CheckpointError
from jit.config import ConfigError, Task, sweep_group, to_plain
from jit.tasks import dispatch


def _user_error_types() -> tuple[type, ...]:
    """Errors that mean bad input (config, paths, files): one line, no traceback wall."""
    from jit.datamodules import CorruptImageError
    from jit.metrics.features import FeatureExtractorError

    return (ConfigError, CheckpointError, ValueError, KeyError, FileNotFoundError, NotADirectoryError,
            PermissionError, CorruptImageError, FeatureExtractorError)


# What an eval/calibrate run writes into its folder. A new run in the same folder removes
# these first, so one folder never mixes two runs; training outputs (checkpoints, logger
# folders) stay, since a resumed run continues them.
RUN_OUTPUTS = ("results.json", "failed.json", "layer_stats.csv", "calibration.pt", "coverage.csv",
               "sample_grid.png", "samples.npz", "samples", "baseline_fp")


def _config_paths(node) -> set[Path]:
    """Every string of the config read as a path: files the run reads must not be removed."""
    if isinstance(node, dict):
        return set().union(*(_config_paths(v) for v in node.values()))
    if isinstance(node, (list, tuple)):
        return set().union(*(_config_paths(v) for v in node))
    return {Path(node).expanduser().resolve()} if isinstance(node, str) and node else set()


def prepare_run_dir(cfg: DictConfig) -> None:
    """Before any work: the output folder (and for eval the cache folder) is writable, and
    the run folder holds no outputs of an earlier run, except files this run reads."""
    import shutil

    from jit.atomic import check_writable

    run_dir = Path(cfg.paths.output_dir)
    check_writable(run_dir)
    if cfg.task == Task.eval:
        check_writable(Path(cfg.paths.cache_dir).expanduser())
    if rank_zero_only.rank != 0:  # DDP/SLURM ranks start the same job: one of them clears
        return
    inputs = _config_paths(to_plain(cfg))
    for path in [run_dir / name for name in RUN_OUTPUTS] + list(run_dir.glob(".samples.rank*.u8")):
        if path.resolve() in inputs or not (path.exists() or path.is_symlink()):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


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
        path.unlink(missing_ok=True)
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


def main(cfg: DictConfig):
    """Run one job; bad input, a full disk or an unwritable path end it with one clear line.

    A single run then exits with code 2, after deleting only the files Hydra created for it
    (the run folder too if that leaves it empty). In a multirun a failing job, whatever the
    exception, records `failed.json` in its folder and returns, so the other jobs carry on;
    the sweep summary lists the failure and the multirun exits non-zero (jit.sweep).
    """
    from jit.console import quiet_dependencies

    quiet_dependencies()
    run_dir = Path(cfg.paths.output_dir)
    multirun = sweep_group(cfg) is not None
    created = _files_hydra_wrote(run_dir)
    try:
        if multirun:  # a reused sweep folder: this job's folder must not show an earlier sweep's rows
            from jit.sweep import mark_sweep_job

            prepare_run_dir(cfg)
            mark_sweep_job(run_dir)
        return dispatch(cfg)
    except Exception as err:
        finish_wandb(1)  # a crashed job must not leave its run open for the next job of a sweep
        message = _one_line_error(err, run_dir)
        if message is None and not multirun:
            raise
        import logging
        import traceback

        trace = "".join(traceback.format_exception(err))
        logging.getLogger("jit").debug(trace)
        if multirun:
            from jit.evaluation.fid import write_json_atomic

            if message is None:  # not bad input: keep the traceback for the user
                print(trace, file=sys.stderr)
                message = " ".join(str(err).split())
            try:
                write_json_atomic({"status": "failed", "error": f"{type(err).__name__}: {message}"},
                                  run_dir / "failed.json")
            except OSError as write_err:
                print(f"could not record the failure: {write_err}", file=sys.stderr)
            print(f"job failed: {message}", file=sys.stderr)
            return None
        print(f"error: {message}", file=sys.stderr)
        _remove_files_of_failed_run(run_dir, created)
        sys.exit(2)
    except BaseException:
        finish_wandb(1)
        raise

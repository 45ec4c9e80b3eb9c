"""`task=search`: a Pareto search over per-layer hardware, minimising (FID, energy).

`search.space` maps unit patterns (globs on the targeted layers' names, as in
quant.layers) to the `quant` fields to search, each leaf a list of choices, e.g.
`{"blocks.0.*": {adc: {bits: [6, 8, 10]}, scheme: [hybrid, fp]}}` (docs/exploration.md).

Each trial picks one value per leaf (Optuna's NSGA-II sampler, seeded below), appends
those picks to `quant.layers` (after the group's own patterns) and runs
an ordinary quantized evaluation of that config (jit/evaluation/pipeline.py) in
`trials/<number>/`: calibration, per-layer statistics, energy estimate, FID over
`fid.num_images`. A pick that repeats a complete trial's assignment takes its numbers
(`same_as`) instead of evaluating it again. Its objectives are those of `search.objectives` (FID, energy per image
in uJ), all minimised.

Static calibration is shared between trials whose calibration would be identical: it
runs with thermal noise off, the ADCs bypassed and ideal devices, so it does not depend
on noise or converter errors; the thresholds do depend on each layer's scheme, bit widths
(the ADC clips are chosen for the ADC's levels) and split. Each distinct calibration is
kept in `calibration_cache/<digest>.pt` and applied to the later trials that need it.
Its first pass, the activation clips, runs with the ADCs bypassed, so it does not depend
on any ADC setting: a trial whose assignment differs from a calibrated one only in ADC
bits (every layer's activation clips depend on the layers before it, so the whole
model's settings without its ADCs are compared) takes those clips from
`calibration_cache/act_<digest>.pt` and runs only the ADC pass
(jit/quant/calibration.py); its artefact is bit for bit that of a full calibration.

The study lives in `search.db` (SQLite), named after a digest of the search space and
everything the trials' numbers depend on. A rerun in the same folder continues it until
`search.n_trials` trials are COMPLETE: a trial a crash left RUNNING is marked FAIL and
its assignment evaluated again, so no trial counts twice. The sampler that picks the
trial after k complete ones is seeded with (`seed`, k) and sees only the complete trials, so a
study interrupted and continued any number of times holds the trials, and the front, of
one run straight through. A `search.db` holding a study of another search space or
configuration is refused.

With `search.front_fid_images=N` each front point is evaluated again with FID over N
images (`front/`), the trials' reduced `fid.num_images` having only ranked them.

Outputs: `pareto.csv` (the front: trial, FID, uJ/image, assignment), `pareto.png` (every
trial, the front highlighted) and each front point as a quant preset
`presets/quant/pareto_<k>.yaml`, run with
`python run.py --config-dir <run dir>/presets quant=pareto_<k>`.
"""

from __future__ import annotations

import csv
import dataclasses
import fnmatch
import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from jit.atomic import atomic_path, atomic_write_json
from jit.config import ConfigError
from jit.console import announce
from jit.evaluation.calibration import ARTEFACT_NAME, run_calibration
from jit.evaluation.pipeline import EvaluationSettings
from jit.passes import attach, evaluate_float_then_quantized
from jit.quant import artefact as art
from jit.quant import build_quant_config, quantize_model, restore_float, target_names
from jit.quant.noise import noise_key
from jit.search_report import plot_front, write_preset
from jit.sensitivity import config_digest, read_json_or_empty
from jit.settings import merged

OBJECTIVES = ("fid", "energy")
DB_NAME = "search.db"
CSV_NAME = "pareto.csv"
PLOT_NAME = "pareto.png"
SUMMARY_NAME = "search.json"
TRIALS_DIR = "trials"
CACHE_DIR = "calibration_cache"
PRESETS_DIR = "presets"
FRONT_DIR = "front"
COLUMNS = ("pareto_k", "trial", "fid", "energy_per_image_uJ", "fid_front", "front_fid_images", "assignment",
           "preset")
ACT_CACHE_PREFIX = "act_"
# Settings calibration runs without (noise off, ADC bypassed, ideal devices): trials that
# differ only in these share one calibration.
_NOT_CALIBRATED = {"adc": ("noise_sigma_lsb", "samples", "bypass", "dnl_sigma_lsb", "inl_max_lsb",
                           "offset_sigma_lsb", "gain_sigma")}
# The activation pass also runs without the ADCs' resolution: trials that differ only in
# these share its clips (the ADC pass runs for each).
_NOT_IN_ACTIVATION_PASS = {"adc": ("bits", *_NOT_CALIBRATED["adc"])}


@dataclass(frozen=True)
class Choice:
    """One searched field: `field` (dotted, e.g. adc.bits) of the layers `pattern` matches."""

    pattern: str
    field: str
    values: tuple

    @property
    def name(self) -> str:  # the Optuna parameter name
        return f"{self.pattern}|{self.field}"


@dataclass(frozen=True)
class SearchSettings:
    n_trials: int
    choices: tuple[Choice, ...]
    objectives: tuple[str, ...]
    front_fid_images: int = 0


def _leaves(node, key: str, prefix: str = ""):
    if isinstance(node, Mapping):
        if not node:
            raise ConfigError(f"{key}{prefix}: an empty mapping; give lists of choices, e.g. {{adc: {{bits: [6, 8]}}}}")
        for name, value in node.items():
            yield from _leaves(value, key, f"{prefix}.{name}" if prefix else str(name))
    elif isinstance(node, (list, tuple)):
        yield prefix, list(node)
    else:
        raise ConfigError(f"{key}.{prefix}: must be a list of choices, got {node!r}")


def nested(field: str, value) -> dict:
    """`adc.bits`, 8 -> {adc: {bits: 8}}."""
    out = value
    for part in reversed(field.split(".")):
        out = {part: out}
    return out


def parse_search(section: Mapping, quant) -> SearchSettings:
    """The `search` section checked against the run's QuantConfig: every choice of every
    field is built into a quant.layers override and validated as quant validates it."""
    n_trials = section.get("n_trials")
    if isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1:
        raise ConfigError(f"search.n_trials: must be an integer >= 1, got {n_trials!r}")
    objectives = tuple(section.get("objectives") or ())
    if not objectives or len(set(objectives)) != len(objectives) or set(objectives) - set(OBJECTIVES):
        raise ConfigError(f"search.objectives: must be distinct names among {', '.join(OBJECTIVES)}, "
                          f"got {list(objectives)}")
    space = section.get("space")
    if not isinstance(space, Mapping) or not space:
        raise ConfigError("search.space: empty; map unit patterns to fields and their choices, e.g. "
                          "{'blocks.0.*': {adc: {bits: [6, 8, 10]}, scheme: [hybrid, fp]}}")
    if not quant.quantizes:
        raise ConfigError("quant: task=search assigns layers to the hardware of quant; quant.scheme=fp has none "
                          "(choose quant=hybrid_w8a11, bitserial_w8a12, w8a8, ...)")
    base = quant.to_dict()
    taken = set(base["layers"])
    choices = []
    for pattern, fields in space.items():
        key = f"search.space[{pattern!r}]"
        if pattern in taken:
            raise ConfigError(f"{key}: the pattern is also in quant.layers; search it there or here, not both")
        if not isinstance(fields, Mapping):
            raise ConfigError(f"{key}: must map quant fields to lists of choices, got {fields!r}")
        for field, values in _leaves(fields, key):
            where = f"{key}.{field}"
            if not values:
                raise ConfigError(f"{where}: an empty list of choices")
            if any(not isinstance(v, (bool, int, float, str)) for v in values) or len(set(values)) != len(values):
                raise ConfigError(f"{where}: choices must be distinct numbers or strings, got {values}")
            for value in values:
                try:
                    build_quant_config({**base, "layers": {**base["layers"], pattern: nested(field, value)}})
                except (ValueError, TypeError) as err:
                    raise ConfigError(f"{where}={value!r}: {err}") from None
            choices.append(Choice(pattern, field, tuple(values)))
    front = section.get("front_fid_images", 0)
    if isinstance(front, bool) or not isinstance(front, int) or front < 0 or front == 1:
        raise ConfigError(f"search.front_fid_images: must be 0 (no re-evaluation) or an integer >= 2, got {front!r}")
    return SearchSettings(n_trials=n_trials, choices=tuple(choices), objectives=objectives,
                          front_fid_images=front)


def assignment(settings: SearchSettings, params: Mapping) -> dict[str, dict]:
    """A trial's picks as quant.layers overrides, {pattern: {adc: {bits: 8}, ...}}."""
    layers: dict[str, dict] = {}
    for choice in settings.choices:
        layers[choice.pattern] = merged(layers.get(choice.pattern, {}), nested(choice.field, params[choice.name]))
    return layers


def trial_quant(quant, layers: Mapping):
    """The run's QuantConfig with the trial's overrides after its own quant.layers."""
    plain = quant.to_dict()
    plain["layers"] = {**plain["layers"], **layers}
    return build_quant_config(plain)


def calibration_key(qcfg, names: list[str], calibration, ignored: Mapping = _NOT_CALIBRATED) -> str:
    """What a static calibration of `qcfg` depends on (see the module doc), as a digest;
    `ignored`: {section: keys} it does not depend on."""
    layers = {}
    for name in names:
        plain = qcfg.layer_config(name).to_dict()
        if plain["scheme"] == "fp":  # a float layer has no thresholds
            layers[name] = "fp"
            continue
        for section, keys in ignored.items():
            plain[section] = {k: v for k, v in plain[section].items() if k not in keys}
        if not calibration.on_device:
            plain.pop("device")
        plain.pop("layers")
        layers[name] = plain
    return config_digest({"layers": layers, "calibration": dataclasses.asdict(calibration)})


def activation_key(qcfg, names: list[str], calibration) -> str:
    """What the activation clips of a static calibration of `qcfg` depend on, as a digest:
    every layer's settings but its ADC's (the pass runs with the ADCs bypassed)."""
    return calibration_key(qcfg, names, calibration, _NOT_IN_ACTIVATION_PASS)


def check_patterns(settings: SearchSettings, names: list[str]) -> None:
    """Every unit pattern of the space matches a targeted layer of the model."""
    for pattern in dict.fromkeys(c.pattern for c in settings.choices):
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            listed = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            raise ConfigError(f"search.space[{pattern!r}]: matches no layer of quant.targets (targeted: {listed})")


# -------------------------------------------------------------------- the study ----
def study_name(digest: str) -> str:
    return f"search-{digest[:16]}"


def check_database(path: Path, digest: str) -> None:
    """Before any work: a search.db holding another study is refused."""
    if not path.exists():
        return
    import optuna
    from sqlalchemy.exc import SQLAlchemyError

    try:
        names = optuna.get_all_study_names(storage=f"sqlite:///{path}")
    except (SQLAlchemyError, RuntimeError) as err:  # a file that is no Optuna database
        raise ConfigError(f"{path}: not an Optuna study database ({type(err).__name__}); move it away or "
                          "choose another hydra.run.dir") from None
    other = [name for name in names if name != study_name(digest)]
    if other:
        raise ConfigError(f"{path} holds the study {other[0]}, made for another search space or configuration "
                          f"(this one is {study_name(digest)}): resume with the same overrides, or choose another "
                          "hydra.run.dir")


def open_study(path: Path, digest: str, settings: SearchSettings, seed: int):
    """The study in `path` (created if new); trials a crash left RUNNING are marked FAIL
    and queued again with the same assignment."""
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(f"sqlite:///{path}")
    study = optuna.create_study(storage=storage, study_name=study_name(digest), load_if_exists=True,
                                directions=["minimize"] * len(settings.objectives),
                                sampler=trial_sampler(seed, 0))
    study.set_user_attr("config_sha256", digest)
    study.set_user_attr("objectives", list(settings.objectives))
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
        announce(f"search: trial {trial.number} was left running by an interrupted run: marked failed, "
                 "its assignment queued again")
        if len(trial.params) == len(settings.choices):
            study.enqueue_trial(trial.params, skip_if_exists=False)
    return study


def trial_sampler(seed: int, complete: int):
    """The sampler that picks the trial after `complete` complete ones: NSGA-II seeded
    with (seed, complete). Its draws depend on the study's complete trials only (failed ones
    are no parents and start no generation), not on how many processes ran the study."""
    import optuna


    return optuna.samplers.NSGAIISampler(seed=noise_key(seed, complete) % 2**32)  # numpy takes 32-bit seeds


def complete_trials(study) -> list:
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


# --------------------------------------------------------------------- the task ----
@dataclass
class SearchRun:
    """What the search needs from the run (jit/tasks.py builds it)."""

    settings: SearchSettings
    quant: object  # QuantConfig
    fid: object  # FIDConfig
    hardware: object  # HardwareConfig
    calibration: object  # CalibrationConfig
    run_dir: Path
    checkpoint: str
    layer_stats_images: int
    digest: str
    seed: int


def objective_values(results: dict) -> dict[str, float]:
    energy = results.get("energy") or {}
    if "energy_per_image_uJ" not in energy:
        raise ConfigError(f"search.objectives: the trial's energy was not estimated ({energy.get('reason', energy)})")
    return {"fid": float(next(iter(results["metrics"].values()))),
            "energy": float(energy["energy_per_image_uJ"])}


def evaluate_trial(trainer, module, datamodule, run: SearchRun, qcfg, run_dir: Path, fid=None) -> dict:
    """One ordinary evaluation of `qcfg` (no float baseline) in `run_dir`; the backbone
    is float again afterwards."""
    evaluation = EvaluationSettings(
        quant=qcfg, fid=fid or run.fid, hardware=run.hardware, calibration=run.calibration, run_dir=run_dir,
        checkpoint=run.checkpoint, compare_fp=False, layer_stats_images=run.layer_stats_images)
    try:
        return evaluate_float_then_quantized(trainer, module, datamodule, evaluation)
    finally:
        restore_float(module.denoiser.net)


def calibrate_adc_pass(trainer, module, datamodule, run: SearchRun, qcfg, trial_dir: Path, clips_from: Path) -> Path:
    """The static calibration of `qcfg` with the activation clips of the artefact
    `clips_from` (made for the same settings but ADCs): only the ADC pass runs, on the
    trainer's device as the trial's own calibration would. Writes calibration.pt and
    coverage.csv into `trial_dir`; the backbone is float again afterwards."""
    act_clips = {name: entry["act_clip"] for name, entry in art.load(clips_from)["layers"].items()}
    attach(trainer, module)
    trial_dir.mkdir(parents=True, exist_ok=True)
    quantize_model(module.denoiser.net, qcfg)
    try:
        outcome = run_calibration(module, qcfg, run.calibration, trial_dir, datamodule=datamodule,
                                  sampler=module.sampler, eval_weights=module.eval_weights, act_clips=act_clips)
    finally:
        restore_float(module.denoiser.net)
    return outcome.artefact_path


def run_search(trainer, module, datamodule, run: SearchRun) -> dict:
    """Trials until `n_trials` are complete, then the front's table, plot and presets."""
    settings = run.settings
    study = open_study(run.run_dir / DB_NAME, run.digest, settings, run.seed)
    done = len(complete_trials(study))
    if done:
        announce(f"search: {done} trial(s) already complete in {run.run_dir / DB_NAME}")
    names = target_names(module.denoiser.net, run.quant.targets)
    cache = run.run_dir / CACHE_DIR
    while done < settings.n_trials:
        study.sampler = trial_sampler(run.seed, done)
        trial = study.ask()
        params = {c.name: trial.suggest_categorical(c.name, list(c.values)) for c in settings.choices}
        layers = assignment(settings, params)
        twin = next((t for t in complete_trials(study) if t.params == params), None)
        if twin is not None:  # the sampler may pick an assignment again: it has its numbers already
            announce(f"search: trial {trial.number} ({done + 1}/{settings.n_trials}) repeats trial {twin.number}'s "
                     "assignment: its results reused")
            for key in ("fid", "energy_per_image_uJ", "layers", "run_dir"):
                trial.set_user_attr(key, twin.user_attrs[key])
            trial.set_user_attr("same_as", twin.number)
            study.tell(trial, list(twin.values))
            done += 1
            continue
        qcfg = trial_quant(run.quant, layers)
        trial_dir = run.run_dir / TRIALS_DIR / f"{trial.number:04d}"
        cached = act_cached = None
        reused = ""
        if qcfg.mode == "static" and qcfg.calibration_file is None:
            cached = cache / f"{calibration_key(qcfg, names, run.calibration)[:16]}.pt"
            act_cached = cache / f"{ACT_CACHE_PREFIX}{activation_key(qcfg, names, run.calibration)[:16]}.pt"
            reused = (" (calibration reused)" if cached.is_file() else
                      " (activation clips reused: the ADC pass only)" if act_cached.is_file() else "")
        announce(f"search: trial {trial.number} ({done + 1}/{settings.n_trials}): {json.dumps(layers)}{reused}")
        if cached is not None and cached.is_file():
            qcfg = dataclasses.replace(qcfg, calibration_file=str(cached))
        elif act_cached is not None and act_cached.is_file():
            artefact = calibrate_adc_pass(trainer, module, datamodule, run, qcfg, trial_dir, act_cached)
            qcfg = dataclasses.replace(qcfg, calibration_file=str(artefact))
        results = evaluate_trial(trainer, module, datamodule, run, qcfg, trial_dir)
        # A crash before `tell` leaves the trial RUNNING: the next run re-evaluates it.
        for kept in (cached, act_cached):
            if kept is not None and not kept.is_file() and (trial_dir / ARTEFACT_NAME).is_file():
                cache.mkdir(parents=True, exist_ok=True)
                with atomic_path(kept) as tmp:
                    shutil.copyfile(trial_dir / ARTEFACT_NAME, tmp)
        values = objective_values(results)
        trial.set_user_attr("fid", values["fid"])
        trial.set_user_attr("energy_per_image_uJ", values["energy"])
        trial.set_user_attr("layers", layers)
        trial.set_user_attr("run_dir", str(trial_dir))
        study.tell(trial, [values[name] for name in settings.objectives])
        done += 1
        announce(f"search: trial {trial.number}: FID {values['fid']:.4g}, {values['energy']:.4g} uJ/image")
    front = sorted((t for t in study.best_trials if "same_as" not in t.user_attrs),
                   key=lambda t: (t.user_attrs["energy_per_image_uJ"], t.user_attrs["fid"]))
    front_fid = evaluate_front(trainer, module, datamodule, run, front, names)
    return write_outputs(study, run, front, front_fid)


def evaluate_front(trainer, module, datamodule, run: SearchRun, front: list, names: list[str]) -> dict[int, float]:
    """With search.front_fid_images=N: each front point's FID over N images, in
    `front/trial_<number>_<N>images/` (kept: a rerun reads it back); {trial number: FID}."""
    n = run.settings.front_fid_images
    if not n:
        return {}
    fid = dataclasses.replace(run.fid, num_images=n)
    fid.validate()
    out = {}
    for k, trial in enumerate(front):
        folder = run.run_dir / FRONT_DIR / f"trial_{trial.number:04d}_{n}images"
        earlier = read_json_or_empty(folder / "results.json")
        if earlier.get("num_images") == n and earlier.get("metrics"):
            out[trial.number] = float(next(iter(earlier["metrics"].values())))
            continue
        qcfg = trial_quant(run.quant, trial.user_attrs["layers"])
        cached = run.run_dir / CACHE_DIR / f"{calibration_key(qcfg, names, run.calibration)[:16]}.pt"
        if qcfg.mode == "static" and qcfg.calibration_file is None and cached.is_file():
            qcfg = dataclasses.replace(qcfg, calibration_file=str(cached))
        announce(f"search: Pareto point {k + 1}/{len(front)} (trial {trial.number}) with FID over {n} images")
        results = evaluate_trial(trainer, module, datamodule, run, qcfg, folder, fid=fid)
        out[trial.number] = float(next(iter(results["metrics"].values())))
    return out


def write_outputs(study, run: SearchRun, front: list, front_fid: dict[int, float]) -> dict:
    trials = complete_trials(study)
    presets = run.run_dir / PRESETS_DIR / "quant"
    presets.mkdir(parents=True, exist_ok=True)
    for stale in presets.glob("pareto_*.yaml"):  # an earlier, smaller front
        stale.unlink()
    rows = []
    for k, trial in enumerate(front):
        path = write_preset(presets / f"pareto_{k}.yaml", trial_quant(run.quant, trial.user_attrs["layers"]), trial)
        rows.append({"pareto_k": k, "trial": trial.number, "fid": trial.user_attrs["fid"],
                     "energy_per_image_uJ": trial.user_attrs["energy_per_image_uJ"],
                     "fid_front": front_fid.get(trial.number),
                     "front_fid_images": run.settings.front_fid_images if trial.number in front_fid else None,
                     "assignment": json.dumps(trial.user_attrs["layers"], sort_keys=True), "preset": str(path)})
    with atomic_path(run.run_dir / CSV_NAME) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
    plot_front(trials, front, run.run_dir / PLOT_NAME)
    summary = {"config_sha256": run.digest, "study": study.study_name, "objectives": list(run.settings.objectives),
               "complete_trials": len(trials), "pareto": rows, "csv": str(run.run_dir / CSV_NAME),
               "plot": str(run.run_dir / PLOT_NAME)}
    atomic_write_json(run.run_dir / SUMMARY_NAME, summary, indent=2)
    return summary

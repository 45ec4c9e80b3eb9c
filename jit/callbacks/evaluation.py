"""Lightning callbacks of an evaluation pass: thin adapters between the test loop and the
Lightning-free maths of jit/evaluation/ and jit/quant/.

A pass is one `trainer.test` over a sample plan (jit/evaluation/plan.py): `JiTModule.test_step`
generates each chunk of the global image index, and the callbacks of the pass decide what
happens around it and with the images (jit/passes.py composes them):

    CalibrationCallback   before the first chunk: counts the float model's MACs of one image,
                          quantizes the backbone and calibrates it (or applies an artefact)
    GenerationPass        the pass's sampler, weights (raw, ema1, ema2), compiled backbone
                          and progress line
    LayerStatsCallback    per-layer statistics of the quantized layers over the pass
    FIDCallback           features of every chunk, FID/IS at the end of the epoch, results.json

and one of training: `FIDEveryNSteps` scores the same sample plan every N optimizer steps
(`callbacks.fid.every_n_steps`), generating with `JiTModule.generate_chunk` as `test_step` does.

Callbacks run their hooks in list order: the calibration callback comes first, so the
quantized layers exist before the weights are swapped in; the generation settings next;
the FID and statistics callbacks last, so they see (and digest) the weights being scored.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch

from jit.console import PhaseProgress, announce
from jit.evaluation.chunks import ChunkStore
from jit.evaluation.fid import FIDConfig, FIDEvaluation
from jit.evaluation.pipeline import prepare_quantized
from jit.hardware import count_targets_and_macs
from jit.models.compile import compiled_forward
from jit.quant import collect_stats, enable_stats, merge_stats, snapshot_stats


class GenerationPass(L.Callback):
    """What `test_step` generates with during this pass: `sampler` overrides of the
    module's sampler, the `weights` swapped in, the backbone compiled (`compile_backbone`),
    and a progress line named `label` over the plan's images."""

    def __init__(self, num_images: int, sampler: dict, weights: str, label: str, compile_backbone: bool = False,
                 progress: bool = True):
        self.num_images, self.sampler, self.weights, self.label = num_images, dict(sampler), weights, label
        self.compile_backbone, self.progress_enabled = compile_backbone, progress
        self._stack: contextlib.ExitStack | None = None
        self._progress: PhaseProgress | None = None
        self._done = 0  # images of this rank so far

    def on_test_start(self, trainer, pl_module) -> None:
        world = trainer.world_size
        plan = trainer.test_dataloaders.dataset
        settings = {**pl_module.sampler, **self.sampler}
        announce(f"{self.label}: {self.num_images} images in chunks of {plan.chunk_size} on "
                 f"{world if plan.sharded else 1} process(es), {settings.get('method')} sampler with "
                 f"{settings.get('steps')} steps")
        if self.compile_backbone:
            # Graphs of earlier passes in this process (the float baseline, earlier jobs of a
            # sweep) guard on modules that are gone; they would count against Dynamo's limit
            # of 8 graphs per code object, past which it runs eagerly.
            torch._dynamo.reset()
        stack = self._stack = contextlib.ExitStack()
        stack.enter_context(pl_module.eval_weights_context(self.weights))
        stack.enter_context(compiled_forward(pl_module.denoiser.net, self.compile_backbone))
        self._progress = stack.enter_context(PhaseProgress(
            self.label, self.num_images, "images", enabled=trainer.is_global_zero and self.progress_enabled))
        self._done = 0
        self._world = world if plan.sharded else 1
        pl_module.test_sampler = dict(self.sampler)

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        n, progress, base = self.num_images, self._progress, min(self.num_images, self._done * self._world)
        in_flight = len(batch["index"]) * self._world

        def advance(steps_done, steps):
            progress.update(min(n, base + in_flight * steps_done / steps))

        pl_module.test_sampler = {**self.sampler, "step_callback": advance}

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if outputs is not None:
            self._done += len(outputs["index"])
        self._progress.update(min(self.num_images, self._done * self._world))

    def on_test_end(self, trainer, pl_module) -> None:
        self._close(pl_module)

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._close(pl_module)

    def _close(self, pl_module) -> None:
        pl_module.test_sampler = {}
        if self._stack is not None:
            stack, self._stack = self._stack, None
            stack.close()


class FIDCallback(L.Callback):
    """Scores the pass's images with `evaluation` (jit/evaluation/fid.py) and writes its
    results.json at the end of the epoch. `extra`, when given, is called then and its
    entries join results.json: what other callbacks of the pass found out (calibration,
    energy). The results stay in `results`.

    Each scored chunk is stored in the run folder as it completes (jit/evaluation/chunks.py),
    with the per-layer statistics `layer_stats` (a LayerStatsCallback of the same pass,
    earlier in the callback list) read from its forwards; a chunk stored by an interrupted
    run of the same evaluation is loaded instead of generated, its statistics handed back.
    `keep_chunks=False` removes the store once results.json is written."""

    def __init__(self, evaluation: FIDEvaluation, datamodule=None, extra: Callable[[], dict] | None = None,
                 keep_chunks: bool = False, layer_stats: LayerStatsCallback | None = None):
        self.evaluation, self.datamodule, self.extra, self.keep_chunks = evaluation, datamodule, extra, keep_chunks
        self.layer_stats = layer_stats
        self.results: dict | None = None
        self.store: ChunkStore | None = None
        self._plan = self._generated = None
        self._started = self._first_batch = 0.0

    def on_test_start(self, trainer, pl_module) -> None:
        self._started = time.perf_counter()
        self._plan = self.evaluation.prepare(trainer, pl_module, self.datamodule)
        self._generated = self.evaluation.start(self._plan)
        self._first_batch = None
        observed = None if self.layer_stats is None else self.layer_stats.num_images or "all"
        self.store = ChunkStore(self._plan.run_dir, self.evaluation.digest(self._plan, pl_module, observed))
        plan = trainer.test_dataloaders.dataset
        plan.done = self.store.done()
        if plan.done:
            announce(f"FID ({self.evaluation.label()}): {len(plan.done)} of {len(plan)} chunks already scored "
                     f"in {self.store.folder}: continuing from there")

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if self._first_batch is None:
            self._first_batch = time.perf_counter()

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        plan = trainer.test_dataloaders.dataset
        index = batch["index"].cpu()
        chunk = plan.chunk_of(index)
        if outputs is not None:
            record = self.evaluation.add(self._plan, self._generated, outputs["index"], outputs["images"])
            if self.layer_stats is not None:
                record.layer_stats = self.layer_stats.chunks.get(chunk)
            self.store.save(chunk, record)
        elif chunk in plan.done and not plan.is_padding(index, trainer.global_rank, trainer.world_size):
            record = self.store.load(chunk)
            self.evaluation.keep(self._plan, self._generated, record)
            if self.layer_stats is not None and record.layer_stats:
                self.layer_stats.chunks[chunk] = record.layer_stats

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        now = time.perf_counter()
        plan, generated, evaluation = self._plan, self._generated, self.evaluation
        evaluation.finish(plan, generated, now - (self._first_batch or now))
        metrics, tiles = evaluation.reduce(plan, generated)
        if self.extra is not None:
            evaluation.extra.update(self.extra())
        self.results = evaluation.report(trainer, pl_module, plan, generated, metrics, tiles,
                                         time.perf_counter() - self._started)
        if not self.keep_chunks:
            trainer.strategy.barrier()  # every rank has read its stored chunks
            if trainer.is_global_zero:
                self.store.remove()

    def on_test_end(self, trainer, pl_module) -> None:
        trainer.test_dataloaders.dataset.done = set()

    def on_exception(self, trainer, pl_module, exception) -> None:
        FIDEvaluation.abort(self._generated)


class LayerStatsCallback(L.Callback):
    """Per-layer statistics (jit/quant/stats.py) of the quantized layers over the pass's
    first `num_images` images (None: all of them), observed inside the pass's own
    forwards: a chunk holding images from `num_images` on is observed up to there; past
    it, statistics are off.

    The counters are read per chunk (`chunks`, which the FID callback stores with its
    chunk and restores on a rerun) and added up in chunk order at the end of the epoch,
    over every rank's chunks, into `rows`: the same numbers at any process count and
    after an interruption."""

    def __init__(self, num_images: int | None = None):
        self.num_images = num_images
        self.rows: list[dict] = []
        self.chunks: dict[int, dict] = {}  # chunk -> snapshot_stats of its forwards

    def on_test_start(self, trainer, pl_module) -> None:
        self.chunks = {}
        plan = trainer.test_dataloaders.dataset
        images = plan.num_images if self.num_images is None else min(self.num_images, plan.num_images)
        announce(f"layer statistics: the first {images} images, observed in this pass's forwards")

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        observed = self.num_images is None or int(batch["index"][0]) < self.num_images
        enable_stats(pl_module.denoiser.net, observed, self.num_images)  # fresh counters

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if outputs is None:
            return
        snapshot = snapshot_stats(pl_module.denoiser.net)
        if snapshot:
            self.chunks[trainer.test_dataloaders.dataset.chunk_of(batch["index"])] = snapshot

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        chunks = self.chunks
        if trainer.test_dataloaders.dataset.sharded and trainer.world_size > 1:
            gathered = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, chunks)
            chunks = {chunk: part for rank_chunks in gathered for chunk, part in rank_chunks.items()}
        self.rows = collect_stats(pl_module.denoiser.net, merge_stats(chunks[k] for k in sorted(chunks)))

    def on_test_end(self, trainer, pl_module) -> None:
        enable_stats(pl_module.denoiser.net, False)

    def on_exception(self, trainer, pl_module, exception) -> None:
        enable_stats(pl_module.denoiser.net, False)


class CalibrationCallback(L.Callback):
    """Puts the model on the hardware of `quant` at the start of the pass, on every process
    and on its device: the float model's MACs of one image first (`fid` image 0, for the
    energy estimate), then `quantize_model` and static calibration with `calibration` or
    the artefact quant.calibration_file (jit/evaluation/pipeline.py, prepare_quantized).
    Afterwards: `dense_macs`, `targets`, `provenance` (what results.json records)."""

    def __init__(self, quant, calibration, fid, run_dir: Path, datamodule=None):
        self.quant, self.calibration, self.fid, self.run_dir = quant, calibration, fid, Path(run_dir)
        self.datamodule = datamodule
        self.dense_macs = self.targets = self.provenance = None

    def on_test_start(self, trainer, pl_module) -> None:
        num_classes = int(pl_module.denoiser.num_classes)
        self.dense_macs, self.targets = count_targets_and_macs(pl_module, self.quant, self.fid, num_classes)
        self.provenance = prepare_quantized(pl_module, self.quant, self.calibration, self.datamodule,
                                            self.run_dir, trainer)


class FIDEveryNSteps(L.Callback):
    """FID while training or fine-tuning: every `every_n_steps` optimizer steps (None: never)
    the weights `fid.eval_weights` (default: the module's) generate the `fid` sample plan,
    each rank its chunks, and the score is logged as `train_fid/<metric>` at that step, its
    results.json in `<run_dir>/step<step>/`. The reference statistics come from the
    trainer's datamodule (or fid.reference.stats_file) and are cached as in evaluation."""

    def __init__(self, fid, every_n_steps: int | None, run_dir):
        if every_n_steps is not None and (isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int)
                                          or every_n_steps < 1):
            raise ValueError(f"callbacks.fid.every_n_steps must be an integer >= 1 or null, got {every_n_steps!r}")
        self.fid = FIDConfig.from_any(fid)
        self.every_n_steps, self.run_dir = every_n_steps, Path(run_dir)
        self._scored_step: int | None = None
        self.results: dict[int, dict] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps is None or step == 0 or step % self.every_n_steps or step == self._scored_step:
            return  # gradient accumulation: several batches end at the same optimizer step
        self._scored_step = step
        # Whatever the evaluation draws (a data loader's seed for the reference statistics)
        # comes from a fork: the training goes on with the random state it had.
        devices = [pl_module.device] if pl_module.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            self._score(trainer, pl_module, step)

    def _score(self, trainer, pl_module, step: int) -> None:
        evaluation = FIDEvaluation(self.fid, run_dir=self.run_dir / f"step{step:07d}", log_prefix="train_fid")
        plan = evaluation.prepare(trainer, pl_module, trainer.datamodule)
        generated = evaluation.start(plan)
        sample_plan = self.fid.sample_plan(pl_module.denoiser)
        rank, world = trainer.global_rank, trainer.world_size
        announce(f"FID at step {step}: {self.fid.num_images} images with the {plan.weights} weights")
        started = time.perf_counter()
        try:
            with pl_module.eval_weights_context(plan.weights), torch.no_grad():
                for chunk in range(rank, len(sample_plan), world):
                    images = pl_module.generate_chunk(sample_plan[chunk], **self.fid.sampler)
                    evaluation.add(plan, generated, images["index"], images["images"])
        except BaseException:
            FIDEvaluation.abort(generated)
            raise
        evaluation.finish(plan, generated, time.perf_counter() - started)
        metrics, tiles = evaluation.reduce(plan, generated)
        self.results[step] = evaluation.report(trainer, pl_module, plan, generated, metrics, tiles,
                                               time.perf_counter() - started)

"""The training engine: one loop for every stage that trains a network (R-CNN fine-tuning, SPP-net's fc layers,
and the Fast and Faster R-CNN stages to come).

A stage hands :func:`train` its model, a dataset whose item ``b`` is mini-batch
``b`` (a function of the stage's seed and ``b`` only), a :class:`Schedule`, a
:class:`Checkpointing` and a function that writes its model; the engine does
the rest, the same way for every stage:

* the device and precision of :mod:`stages.core.device`, with a
  :class:`torch.amp.GradScaler` under float16 autocast;
* SGD with momentum and weight decay over the parameters that require
  gradients, the learning rate of :meth:`Schedule.lr_factor`, and the
  weights' average over the last iterations where the schedule asks for it
  (:attr:`Schedule.average_last`, :class:`torch.optim.swa_utils.AveragedModel`);
* loading: batch numbers ``start, ..., iterations - 1`` through a
  :class:`~torch.utils.data.DataLoader`, read by spawned worker processes (a
  fork of a process whose torch/OpenCV thread pools already run can deadlock)
  or, for one worker, by the training process itself; pinned memory and
  non-blocking copies on CUDA;
* a tqdm progress bar, and the loss curve CSV of
  :func:`stages.ops.sampling.curve_rows` (one row every ``iterations // 200``
  iterations and at the last);
* checkpoints and resume (:class:`Checkpointing`).

Resuming is exact: a resumed CPU run writes the same model bytes as an
uninterrupted one. The data order is a function of the iteration (the sampler
restarts at the checkpoint's iteration), and the checkpoint restores the model,
its running average, the optimiser (momentum buffers), the learning-rate
schedule, the gradient scaler, the curve so far and every random generator
(dropout draws from torch's; the loader draws its worker seeds from a generator
of its own, so starting a loader leaves torch's stream where the checkpoint
found it).
"""
from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import random
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from stages.core.atomic import atomic_path, write_text
from stages.core.device import autocast, needs_grad_scaler, pick_device
from stages.core.errors import PipelineError
from stages.core.faults import reached
from stages.ops.sampling import CURVE_WINDOW, curve_rows

CURVE_ROWS = 200  # about this many rows per loss curve

Step = Callable[[nn.Module, Any], tuple[Tensor, Tensor]]  # (model, batch on the device) -> (loss, accuracy)


class TrainingError(PipelineError, ValueError):
    """Training diverged."""


@dataclass(frozen=True)
class Schedule:
    """``iterations`` SGD steps; the learning rate is multiplied by ``lr_gamma`` every ``lr_step`` iterations.

    ``warmup`` > 0 adds a linear warm-up over the first ``warmup`` iterations. ``average_last`` > 0 makes the
    trained model the mean of the weights after each of the last :attr:`averaged_iterations` iterations instead of
    the last iterate (Polyak-Ruppert averaging), which steadies the result against the seed's draws (README, "R-CNN
    over five seeds").
    """

    iterations: int
    learning_rate: float
    momentum: float
    weight_decay: float
    lr_step: int
    lr_gamma: float
    warmup: int = 0
    average_last: float = 0.0

    @classmethod
    def of(cls, params: object, examples: int, batch: int) -> Schedule:
        """The schedule of a params section for ``examples`` training examples (images or windows) drawn ``batch``
        a mini-batch.

        The length scales with the data: ``epochs`` passes over the examples (rounded up to whole iterations, at
        least one), at most
        ``max_iterations``; the learning rate steps every ``lr_drop`` of them (2/3: once, two thirds of the way).
        The section's other keys named like the fields are taken as they are (those it lacks keep their defaults).
        """
        iterations = min(params.max_iterations, max(1, math.ceil(params.epochs * examples / batch)))
        taken = {f.name: getattr(params, f.name) for f in fields(cls)
                 if f.name not in ("iterations", "lr_step") and hasattr(params, f.name)}
        return cls(iterations=iterations, lr_step=max(1, round(params.lr_drop * iterations)), **taken)

    @property
    def averaged_iterations(self) -> int:
        """How many of the last iterates the trained model averages: ``average_last`` of them, at least one."""
        return max(1, round(self.average_last * self.iterations))

    def lr_factor(self, iteration: int) -> float:
        """The learning rate of 0-based ``iteration``, over ``learning_rate``.

        ``lr_gamma ** (iteration // lr_step)``, times ``(iteration + 1) / warmup`` during the warm-up.
        """
        warm = min(1.0, (iteration + 1) / self.warmup) if self.warmup else 1.0
        return warm * self.lr_gamma ** (iteration // self.lr_step)


@dataclass(frozen=True)
class Checkpointing:
    """Where and how often to checkpoint, and what a checkpoint may be resumed for.

    Every ``every`` iterations (0 = never; never at the last iteration) the
    training state is written atomically to ``path``. A run resumes from
    ``path`` only if the checkpoint's key is :attr:`key`, the hash of
    ``provenance`` (the params, code version and input digests the stage's
    artifact records); any other checkpoint there is removed. The checkpoint is
    removed as soon as the stage's outputs are written, so a finished run
    leaves none behind.
    """

    path: Path
    every: int
    provenance: Mapping[str, Any]

    @property
    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.provenance, sort_keys=True).encode()).hexdigest()

    def due(self, iteration: int, iterations: int) -> bool:
        """Whether to checkpoint after ``iteration`` (1-based) iterations of ``iterations``."""
        return self.every > 0 and iteration % self.every == 0 and iteration < iterations


def classification_step(model: nn.Module, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """``(N, ...)`` inputs and ``(N,)`` int64 labels -> cross-entropy loss and accuracy, both 0-d tensors."""
    x, y = batch
    logits = model(x)
    return nn.functional.cross_entropy(logits.float(), y), (logits.argmax(1) == y).float().mean()


def single_threaded_worker(_: int) -> None:
    """Loader workers compute on one thread each: parallelism comes from the worker processes."""
    import cv2

    cv2.setNumThreads(1)
    torch.set_num_threads(1)


def write_torch(path: Path, payload: Mapping[str, Any]) -> None:
    """``torch.save`` ``payload`` to ``path`` atomically: the same payload always gives the same bytes."""
    with atomic_path(path, ".pt") as tmp, open(tmp, "wb") as f:
        # To a file object, not a path: torch.save names the zip's records after the file, and
        # the temporary's random name would make two identical runs differ byte for byte.
        torch.save(payload, f)


def to_device(batch: Any, device: torch.device) -> Any:
    """The tensors of ``batch`` (a tensor, or tuples, lists, dicts of them) on ``device``, copied without blocking."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(item, device) for item in batch)
    if isinstance(batch, dict):
        return {name: to_device(item, device) for name, item in batch.items()}
    return batch


class _Training:
    """What a checkpoint holds besides the random generators: model, its running average (``average_last``),
    optimiser, schedule, scaler, curve so far."""

    def __init__(self, model: nn.Module, schedule: Schedule, device: torch.device) -> None:
        self.model = model
        self.optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=schedule.learning_rate,
                                         momentum=schedule.momentum, weight_decay=schedule.weight_decay)
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda i: schedule.lr_factor(i))
        self.scaler = torch.amp.GradScaler(device.type, enabled=needs_grad_scaler(device))
        self.averaged = torch.optim.swa_utils.AveragedModel(model) if schedule.average_last > 0 else None
        self.average_from = schedule.iterations - schedule.averaged_iterations
        self.losses: list[float] = []
        self.accuracies: list[float] = []

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_schedule": self.lr_schedule.state_dict(),
            "grad_scaler": self.scaler.state_dict(),
            "averaged": None if self.averaged is None else self.averaged.state_dict(),
            "losses": list(self.losses),
            "accuracies": list(self.accuracies),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        self.scaler.load_state_dict(state["grad_scaler"])
        if self.averaged is not None:
            self.averaged.load_state_dict(state["averaged"])
        self.losses, self.accuracies = list(state["losses"]), list(state["accuracies"])

    def step(self, step: Step, batch: Any, device: torch.device) -> tuple[float, float]:
        with autocast(device):
            loss, accuracy = step(self.model, batch)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.lr_schedule.step()
        return loss.item(), accuracy.item()

    def average(self, iteration: int) -> None:
        """Add the weights after 1-based ``iteration`` to the average if it is one of the averaged last ones."""
        if self.averaged is not None and iteration > self.average_from:
            self.averaged.update_parameters(self.model)

    def trained_model(self) -> nn.Module:
        """The model with its weights averaged (with ``average_last``; buffers, e.g. batch-norm statistics, stay the
        last iterate's), else as the last step left it."""
        if self.averaged is not None:
            with torch.no_grad():
                for weight, mean in zip(self.model.parameters(), self.averaged.module.parameters()):
                    weight.copy_(mean)
        return self.model


def rng_state() -> dict[str, Any]:
    """Every random generator's state: Python's, NumPy's global bit generator, torch's CPU and CUDA generators."""
    numpy = np.random.get_state(legacy=False)
    numpy["state"] = {**numpy["state"], "key": numpy["state"]["key"].tolist()}  # plain data: loads with weights_only
    return {
        "python": random.getstate(),
        "numpy": numpy,
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_checkpoint(training: _Training, checkpointing: Checkpointing, iteration: int) -> None:
    """``iteration`` is also the sampler's position: the batches to come are ``iteration, iteration + 1, ...``."""
    state = {"key": checkpointing.key, "iteration": iteration, "rng": rng_state(), **training.state_dict()}
    write_torch(checkpointing.path, state)
    reached("checkpoint-written")


def _resume(training: _Training, checkpointing: Checkpointing, name: str) -> int:
    """Restore the checkpoint of this very run, if there is one; the iterations it had done (0: start over)."""
    path = checkpointing.path
    if not path.is_file():
        return 0
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        usable = saved["key"] == checkpointing.key
    except Exception:  # torch raises many kinds for a file that is not a checkpoint
        usable = False
    if not usable:
        print(f"{name}: {path} is not a checkpoint of these params, code and inputs; removed, starting over",
              flush=True)
        path.unlink()
        return 0
    training.load_state_dict(saved)
    set_rng_state(saved["rng"])
    print(f"{name}: resumed from {path} at iteration {saved['iteration']}", flush=True)
    return int(saved["iteration"])


def _loader(batches: Dataset, start: int, iterations: int, num_workers: int, worker_init: Callable[[int], None],
            device: torch.device) -> DataLoader:
    workers = max(1, num_workers or os.cpu_count() or 1)
    processes = workers if workers > 1 else 0  # one worker reads in the training process: no start-up cost
    return DataLoader(
        batches,
        batch_size=None,  # each item is already a mini-batch
        sampler=range(start, iterations),
        num_workers=processes,
        multiprocessing_context=multiprocessing.get_context("spawn") if processes else None,
        worker_init_fn=worker_init if processes else None,
        pin_memory=device.type == "cuda",
        prefetch_factor=2 if processes else None,
        generator=torch.Generator().manual_seed(0),  # worker seeds from here, not from torch's global stream
    )


def train(
    model: nn.Module,
    batches: Dataset,
    schedule: Schedule,
    checkpointing: Checkpointing,
    save_model: Callable[[nn.Module], None],
    curve_path: Path,
    *,
    name: str,
    num_workers: int = 0,
    step: Step = classification_step,
    worker_init: Callable[[int], None] = single_threaded_worker,
    describe: Callable[[Any], str] = lambda batch: "",
) -> None:
    """Train ``model`` for ``schedule.iterations`` mini-batches ``batches[b]``, resuming from a checkpoint of this run.

    ``step(model, batch)`` (run under autocast, ``batch`` already on the device)
    returns the loss to minimise and the accuracy, 0-d tensors. ``num_workers``
    loader workers, 0 = all cores. At the end ``save_model`` gets the trained
    model (its weights averaged over the last iterations if ``schedule.average_last``), in eval mode on the CPU, to
    write the stage's artifact; then the
    loss curve is written to ``curve_path`` and the checkpoint removed.
    ``name`` labels the progress bar and messages. :class:`TrainingError` if
    the loss stops being finite, naming the iteration and ``describe(batch)``
    (e.g. the batch's images); the last checkpoint is kept.
    """
    device = pick_device()
    # Contiguous, not channels_last: on the CPU, channels_last backward passes measured 2.5x slower
    # (EfficientNet-Lite0, batch 32 at 96 px), although its forward pass is 1.6x faster (stages.features).
    model.to(device).train()
    training = _Training(model, schedule, device)
    print(f"{name}: {schedule.iterations} iterations, learning rate {schedule.learning_rate:g} (x{schedule.lr_gamma:g} "
          f"every {schedule.lr_step}"
          + (f", weights averaged over the last {schedule.averaged_iterations})" if schedule.average_last else ")"),
          flush=True)
    start = _resume(training, checkpointing, name)
    loader = _loader(batches, start, schedule.iterations, num_workers, worker_init, device)
    progress = tqdm(loader, total=schedule.iterations, initial=start, desc=name, unit="it")
    for iteration, batch in enumerate(progress, start + 1):
        loss, accuracy = training.step(step, to_device(batch, device), device)
        if not math.isfinite(loss):
            kept = f"; the last checkpoint, {checkpointing.path}, is kept" if checkpointing.path.is_file() else ""
            raise TrainingError(f"{name}: training diverged at iteration {iteration} (loss {loss}"
                                f"{describe(batch)}){kept}; lower the learning rate")
        training.average(iteration)
        training.losses.append(loss)
        training.accuracies.append(accuracy)
        recent = slice(-CURVE_WINDOW, None)
        progress.set_postfix(loss=f"{np.mean(training.losses[recent]):.3f}",
                             acc=f"{np.mean(training.accuracies[recent]):.2f}")
        if checkpointing.due(iteration, schedule.iterations):
            _write_checkpoint(training, checkpointing, iteration)
    progress.close()
    save_model(training.trained_model().cpu().eval())
    every = max(1, schedule.iterations // CURVE_ROWS)
    write_text(curve_path, "\n".join(curve_rows(training.losses, training.accuracies, every)) + "\n")
    checkpointing.path.unlink(missing_ok=True)

"""The training engine: learning-rate schedule, weight averaging, checkpoints every k iterations, exact resume, foreign
checkpoints."""
from __future__ import annotations

import random
from types import SimpleNamespace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from stages.core import engine
from stages.core.engine import Checkpointing, Schedule, TrainingError, classification_step, train

PROVENANCE = {"params": {"seed": 0}, "code_version": "abc", "inputs": {"data": "123"}}


class Crash(Exception):
    """Stands for a killed process: what it leaves behind is the last checkpoint."""


def crash_at(nth: int):
    """A stand-in for ``faults.reached`` that crashes the ``nth`` time a checkpoint is written."""
    calls = []

    def reached(point: str) -> None:
        calls.append(point)
        if len(calls) == nth:
            raise Crash(point)
    return reached


def schedule(**changes) -> Schedule:
    values = {"iterations": 5, "learning_rate": 0.1, "momentum": 0.9, "weight_decay": 0.0005, "lr_step": 2,
              "lr_gamma": 0.5, **changes}
    return Schedule(**values)


class Batches(Dataset):
    """Batch ``b``: 8 random 4-d points with labels 0-2, a function of ``b`` only."""

    def __getitem__(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([0, b])
        return torch.from_numpy(rng.normal(size=(8, 4)).astype(np.float32)), torch.from_numpy(rng.integers(0, 3, 8))


def noisy_step(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy scaled by draws of Python's and NumPy's generators: a resume must restore both."""
    loss, accuracy = classification_step(model, batch)
    return loss * (1 + 0.1 * random.random()) * (1 + 0.1 * np.random.random()), accuracy


def network(seed: int) -> nn.Module:
    """A small classifier, initialised with ``seed``, which also seeds Python's and NumPy's generators."""
    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3))  # dropout: torch's generator


def fit(folder: Path, sched: Schedule, every: int, provenance: dict = PROVENANCE, step=noisy_step,
        seed: int = 0) -> bytes:
    """Train :func:`network` in ``folder``; the saved state dict's bytes."""
    out = folder / "model.pt"
    train(network(seed), Batches(), sched, Checkpointing(folder / "checkpoint.pt", every, provenance),
          lambda model: engine.write_torch(out, model.state_dict()), folder / "curve.csv",
          name="test", num_workers=1, step=step)
    return out.read_bytes()


def test_schedule_length_scales_with_the_data_up_to_the_cap():
    section = SimpleNamespace(epochs=2.5, max_iterations=100, learning_rate=0.1, momentum=0.9, weight_decay=0.0,
                              lr_drop=0.6667, lr_gamma=0.1, warmup=3)
    # (examples, batch): 2.5 passes of 48 / 2 = 24 batches; 17.5 rounded up; the cap; at least one; the drop two
    # thirds of the way each time
    cases = {(48, 2): (60, 40), (7, 1): (18, 12), (2000, 2): (100, 67), (1, 100): (1, 1)}
    lengths = {case: Schedule.of(section, *case) for case in cases}
    assert {case: (s.iterations, s.lr_step) for case, s in lengths.items()} == cases
    assert Schedule.of(section, 48, 2) == Schedule(60, 0.1, 0.9, 0.0, 40, 0.1, warmup=3)


def test_lr_factor_by_hand():
    assert [schedule(lr_step=3).lr_factor(i) for i in range(7)] == [1, 1, 1, 0.5, 0.5, 0.5, 0.25]
    warm = schedule(lr_step=3, warmup=4)
    assert [warm.lr_factor(i) for i in range(7)] == [0.25, 0.5, 0.75, 0.5, 0.5, 0.5, 0.25]


def test_sgd_steps_by_the_schedule(tmp_path):
    # loss = w: each step subtracts the learning rate from w (no momentum, no weight decay)
    model = nn.Linear(1, 1, bias=False)
    nn.init.zeros_(model.weight)
    sched = schedule(momentum=0.0, weight_decay=0.0, iterations=5, lr_step=2)
    train(model, Batches(), sched, Checkpointing(tmp_path / "checkpoint.pt", 0, PROVENANCE), lambda _: None,
          tmp_path / "curve.csv", name="test", num_workers=1,
          step=lambda m, batch: (m.weight.sum(), torch.tensor(1.0)))
    assert model.weight.item() == pytest.approx(-(0.1 + 0.1 + 0.05 + 0.05 + 0.025))


def test_weights_averaged_over_the_last_iterations_by_hand(tmp_path):
    # loss = w: the weights after steps 1-5 are -0.1, -0.2, -0.25, -0.3, -0.325; the last 2 of 5 are averaged
    sched = schedule(momentum=0.0, weight_decay=0.0, iterations=5, lr_step=2, average_last=0.4)
    assert sched.averaged_iterations == 2 and schedule(iterations=5, average_last=0.01).averaged_iterations == 1
    model = nn.Linear(1, 1, bias=False)
    nn.init.zeros_(model.weight)
    saved = []
    train(model, Batches(), sched, Checkpointing(tmp_path / "checkpoint.pt", 0, PROVENANCE),
          lambda trained: saved.append(trained.weight.item()), tmp_path / "curve.csv", name="test", num_workers=1,
          step=lambda m, batch: (m.weight.sum(), torch.tensor(1.0)))
    assert saved == [pytest.approx(-(0.3 + 0.325) / 2)]


def test_checkpoints_every_k_iterations_never_at_the_last_and_removed_at_the_end(tmp_path, monkeypatch):
    checkpoint = tmp_path / "checkpoint.pt"
    written = []
    monkeypatch.setattr(engine, "reached", lambda point: written.append(torch.load(checkpoint)["iteration"]))
    present_when_saving = []
    train(network(0), Batches(), schedule(iterations=6), Checkpointing(checkpoint, 2, PROVENANCE),
          lambda model: present_when_saving.append(checkpoint.exists()), tmp_path / "curve.csv", name="test",
          num_workers=1)
    assert written == [2, 4] and present_when_saving == [True] and not checkpoint.exists()
    lines = (tmp_path / "curve.csv").read_text().splitlines()
    assert lines[0] == "iteration,loss,accuracy" and [line.split(",")[0] for line in lines[1:]] == list("123456")


@pytest.mark.parametrize("average_last", [0.0, 0.5])  # 0.5: the last 4 of 7 averaged, the crash after the 6th
def test_interrupted_run_resumes_to_the_same_bytes(tmp_path, monkeypatch, average_last):
    sched = schedule(iterations=7, average_last=average_last)
    whole = fit(tmp_path / "whole", sched, every=3)
    with monkeypatch.context() as patch, pytest.raises(Crash):
        patch.setattr(engine, "reached", crash_at(2))
        fit(tmp_path / "resumed", sched, every=3)
    assert torch.load(tmp_path / "resumed" / "checkpoint.pt")["iteration"] == 6

    steps = []

    def counting(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        steps.append(1)
        return noisy_step(model, batch)
    # another initialisation and other generator states: the checkpoint must restore them all
    assert fit(tmp_path / "resumed", sched, every=3, step=counting, seed=1) == whole
    assert len(steps) == 1 and not (tmp_path / "resumed" / "checkpoint.pt").exists()
    assert (tmp_path / "resumed" / "curve.csv").read_text() == (tmp_path / "whole" / "curve.csv").read_text()


def test_checkpoint_of_another_run_is_removed_and_ignored(tmp_path, monkeypatch, capsys):
    whole = fit(tmp_path / "whole", schedule(), every=0)
    folder = tmp_path / "other"
    with monkeypatch.context() as patch, pytest.raises(Crash):
        patch.setattr(engine, "reached", crash_at(1))
        fit(folder, schedule(), every=2, provenance={**PROVENANCE, "code_version": "older"})
    assert (folder / "checkpoint.pt").exists()
    capsys.readouterr()
    assert fit(folder, schedule(), every=0) == whole
    assert "not a checkpoint of these params, code and inputs; removed" in capsys.readouterr().out
    assert not (folder / "checkpoint.pt").exists()

    (folder / "checkpoint.pt").write_bytes(b"not a checkpoint")
    assert fit(folder, schedule(), every=0) == whole and not (folder / "checkpoint.pt").exists()


def test_divergence_is_a_clear_error(tmp_path):
    with pytest.raises(TrainingError, match="diverged at iteration 1"):
        fit(tmp_path, schedule(), every=0, step=lambda model, batch: (torch.tensor(float("nan"), requires_grad=True),
                                                                        torch.tensor(0.0)))

"""Helpers shared by test modules (test modules never import each other)."""
from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import json

import numpy as np
import pytest
import yaml

from pipeline.project import scratch_project, write_params  # noqa: F401  (write_params: for test modules)
from stages.core import layout
from stages.core.config import FAST_RCNN_MODELS, FASTER_RCNN_RECIPES, RECIPES, Config
from stages.core.store import RowSpec, create_per_image, shard_path
from stages.data.featureset import IMAGE_DATASETS, class_iou, feature_row, region_rows
from stages.data.voc import Problems, discover_classes, find_image, read_annotations, read_split_ids
from stages.ops.boxes import xyxy_to_xywh

REPO = Path(__file__).resolve().parents[1]
BCCD = REPO.parent / "shared" / "datasets" / "BCCD"
BIN = Path(sys.executable).parent

# Small enough that the whole DAG runs in seconds; still several classes, splits and shards.
TINY = {
    "synthetic": {"num_trainval": 6, "num_test": 4, "min_side": 96, "max_side": 160, "max_object_size": 64},
    "sharding": {"shards": [0, 1]},
    "proposals": {"max_side": 160, "max_boxes": 300},
    "finetune": {"input_size": 64, "batch_size": 8, "epochs": 100.0, "max_iterations": 3,
                 "lr_drop": 0.667},
    "features": {"batch_size": 16},
    "sppnet": {"scales": [128], "max_side": 200, "hidden": 64, "batch_size": 32, "epochs": 100.0,
               "max_iterations": 5, "lr_drop": 0.6},
    "fast_rcnn": {"scales": [128], "max_side": 200, "hidden": 64, "rois_per_image": 16, "ohem_rois": 16,
                  "roi_chunk": 64, "epochs": 100.0, "max_iterations": 4, "lr_drop": 0.75, "warmup": 0, "svd_ranks": [16, 8]},
    "faster_rcnn": {"anchor_sizes": [32, 64, 128], "train_pre_nms": 600, "train_proposals": 100, "test_pre_nms": 300,
                    "test_proposals": 50, **{step: {"epochs": 100.0, "max_iterations": 4, "learning_rate": 0.002,
                                                    "momentum": 0.9, "weight_decay": 0.0005, "lr_drop": 0.75,
                                                    "lr_gamma": 0.1, "warmup": 0}
                                             for step in ("step1", "step4")}},
    "svm": {"norm_sample": 500, "retrain_every": 200},
    "evaluate": {"gallery": 2},
    "runtime": {"num_workers": 2},
}


def tiny_params() -> dict:
    """params.yaml with the TINY overrides, as a plain mapping."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in TINY.items():
        params[section].update(values)
    return params


def replace_section(cfg: Config, section: str, **changes) -> Config:
    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **changes)})


def spp_config(cfg: Config) -> Config:
    """The tiny config with a small single scale and a two-level pyramid, to stay fast."""
    return replace_section(cfg, "sppnet", scales=(128,), levels=(1, 2), max_side=256)


def run_spp(cfg: Config, split: str, shard: int, out: Path, num_workers: int = 1) -> None:
    from stages import spp_features  # PyTorch: imported by the tests that need it

    spp_features.run(cfg.sppnet, cfg.features, cfg.finetune, split, shard, cfg.sharding.num_shards,
                     cfg.data.train_split, out, num_workers=num_workers)


def write_features(split: str, images: list[dict], classes: list[str], num_shards: int = 1, **attrs) -> None:
    """rcnn feature shards of ``images`` (dicts: id, boxes, gt_label, pool, fc, scores, size; iou optional).

    ``iou`` defaults to each row's best IoU with the image's ground-truth rows of each class.
    Images are split into ``num_shards`` consecutive runs, as proposal shards are.
    """
    first = images[0]
    rows = {
        **region_rows(len(classes)),
        "pool": feature_row(first["pool"].shape[1], "float16", 4),
        "fc": feature_row(first["fc"].shape[1], "float16", 4),
        "scores": RowSpec((len(classes) + 1,), np.float32),
    }
    for k, part in enumerate(np.array_split(np.arange(len(images)), num_shards)):
        shard_attrs = {"classes": classes, "split": split, "shard_index": k, "num_shards": num_shards,
                       "recipe": "rcnn", **attrs}
        with create_per_image(shard_path(layout.features_dir("rcnn", split), k), rows, shard_attrs,
                              IMAGE_DATASETS) as writer:
            for i in part:
                image = images[i]
                boxes, labels = np.asarray(image["boxes"], np.float32), np.asarray(image["gt_label"], np.int32)
                gt = labels >= 0
                iou = image.get("iou", class_iou(boxes, boxes[gt], labels[gt], len(classes)))
                values = {"boxes": boxes, "gt_label": labels, "iou": iou, "pool": image["pool"], "fc": image["fc"],
                          "scores": image["scores"]}
                writer.append(image["id"], values, widths=image["size"][0], heights=image["size"][1])


def voc_to_coco(root: Path, files: dict[str, Path]) -> None:
    """Write each VOC split of ``root`` (``{split: COCO file}``) as a COCO instances file, images in JPEGImages/.

    Every object is kept as it is, bad ones too, so that both routes meet the same problems. An
    XML that does not parse is left out (its image then is in neither file, as the VOC route
    drops it). Category ids follow the sorted names from 1 and are listed in reverse, so a reader
    must order them by id, not by position; COCO's numeric ids are offset from the positions.
    """
    ids = {split: read_split_ids(root, split, Problems("skip")) for split in files}
    annotations = read_annotations(root, sorted({i for split_ids in ids.values() for i in split_ids}), Problems("skip"))
    category = {name: k + 1 for k, name in enumerate(discover_classes(list(annotations.values())))}
    for split, path in files.items():
        images, anns = [], []
        for image_id in (i for i in ids[split] if i in annotations):
            ann = annotations[image_id]
            image = find_image(root, image_id, ann.filename)
            number = 100 + len(images)
            images.append({"id": number, "file_name": image.name if image else f"{image_id}.jpg",
                           "width": ann.width, "height": ann.height})
            for obj, bbox in zip(ann.objects, xyxy_to_xywh([o.box for o in ann.objects]).tolist()):
                anns.append({"id": 1000 + len(anns), "image_id": number, "category_id": category[obj.name],
                             "bbox": bbox, "area": bbox[2] * bbox[3], "iscrowd": int(obj.difficult)})
        categories = [{"id": k, "name": name} for name, k in reversed(category.items())]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"images": images, "annotations": anns, "categories": categories}))


def environment(folder: Path) -> dict[str, str]:
    """The environment of a subprocess working in ``folder``: its code first, the venv's tools on PATH."""
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(folder)}


def sh(folder: Path, *command: str) -> str:
    """Run ``command`` in ``folder``; fail the test with its output unless it succeeds."""
    result = run_to_end(list(command), folder)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def project_copy(folder: Path, params: dict) -> Path:
    """A fresh project (code, generated dvc.yaml, ``params``) that both orchestrators can run in."""
    return scratch_project(folder, params)


def artifacts(folder: Path) -> dict[str, bytes]:
    """Every HDF5 artifact and the model, curve, detection and metrics files that exist (runs of part of
    the DAG have only some)."""
    found = {str(p.relative_to(folder)): p.read_bytes() for p in sorted((folder / layout.CACHE).rglob("*.h5"))
             if layout.RUNS not in p.relative_to(folder).parents}
    outputs = [layout.FINETUNED_MODEL, layout.FINETUNE_CURVE, layout.SPP_HEAD, layout.SPP_FINETUNE_CURVE,
               layout.PROPOSAL_METRICS, layout.coco_ground_truth("test")]
    for model in FAST_RCNN_MODELS:
        outputs += [layout.fast_rcnn_model(model), layout.fast_rcnn_curve(model)]
    for model in ("m1", "m2", "m3", *FASTER_RCNN_RECIPES):
        outputs += [layout.faster_rcnn_model(model), layout.faster_rcnn_curve(model)]
    outputs += [layout.rpn_recall_metrics(model) for model in ("m1", "m3")]
    for recipe in RECIPES:
        outputs += [layout.coco_detections(recipe), layout.map_metrics(recipe), layout.pr_curve(recipe)]
    for path in outputs:
        if (folder / path).is_file():
            found[str(path)] = (folder / path).read_bytes()
    return found


# --- subprocesses ------------------------------------------------------------------------------


class Processes:
    """Subprocesses of one test, each in its own session so that its whole group can be killed."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen] = []

    def start(self, folder: Path, args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
        """Run ``args`` in ``folder`` (PYTHONPATH too, unless ``env`` is given), output to ``log``."""
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                args, cwd=folder, env=env or environment(folder), stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.started.append(proc)
        return proc

    @staticmethod
    def kill(proc: subprocess.Popen) -> None:
        """SIGKILL the process and everything it started (its pool workers, Luigi's task processes)."""
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait(timeout=30)

    def close(self) -> None:
        for proc in self.started:
            self.kill(proc)


def run_to_end(args: list[str], folder: Path, timeout: float | None = None) -> subprocess.CompletedProcess:
    """Run ``args`` in ``folder`` (its code first) in a session of its own and wait for it; then kill what is
    left of that session (pool workers), also when it runs past ``timeout`` seconds."""
    proc = subprocess.Popen(args, cwd=folder, env=environment(folder), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        Processes.kill(proc)
    return subprocess.CompletedProcess(args, proc.returncode, stdout, stderr)


def wait_for(condition: Callable[[], bool], timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    """Poll ``condition`` until it holds; fail the test after ``timeout`` s or when ``proc`` ends first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the process ended (status {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def luigi_command(*extra: str, workers: int = 2) -> list[str]:
    """``luigi ... Recall``: the data and sharded proposal stages.

    ``--no-lock``: Luigi's default lock is per command line and machine, so an identical
    command in another project folder (another test run) would make this one a no-op.
    """
    return [str(BIN / "luigi"), "--module", "pipeline", "Recall", "--workers", str(workers), "--no-lock", *extra]


TASK_LINE = re.compile(r"\b(running|done|failed) {2,}(\w+\([^()\n]*\))")


def task_events(log: str) -> list[tuple[str, str]]:
    """``(event, task)`` for every task a Luigi worker started (running), finished (done) or failed."""
    return TASK_LINE.findall(log)


def ran_instances(log: str) -> list[str]:
    """The stage instances a Luigi run ran, in order: the pipeline's ``pipeline: running ADDRESS`` lines."""
    marker = "pipeline: running "
    return [line.split(marker, 1)[1].strip() for line in log.splitlines() if line.startswith(marker)]

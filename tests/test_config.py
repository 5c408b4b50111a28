"""params.yaml loading: the real file loads; every kind of mistake names its key or file."""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml

from stages.core.config import (
    BboxParams,
    Config,
    RECIPES,
    ConfigError,
    ShardingParams,
    as_dict,
    load_config,
    trained_model,
)
from stages.core.errors import PipelineError

REAL = Path(__file__).resolve().parent.parent / "params.yaml"
RAW: dict[str, Any] = yaml.safe_load(REAL.read_text())


def _write(tmp_path: Path, raw: Any) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _modified(tmp_path: Path, section: str, key: str, value: Any) -> Path:
    raw = copy.deepcopy(RAW)
    raw[section][key] = value
    return _write(tmp_path, raw)


def _error(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return str(info.value)


def test_real_params_load() -> None:
    cfg = load_config(REAL)
    assert isinstance(cfg, Config)
    assert cfg.data.classes == ()
    assert cfg.data.on_error == "raise"
    assert cfg.data.splits == ("trainval", "test")
    assert cfg.sharding.shards == (0,)
    assert cfg.sharding.num_shards == 1
    assert cfg.proposals.mode == "fast"
    assert cfg.proposals.sigma == 0.8
    # written as 8.0 in the file, stays a float
    assert cfg.proposals.min_size == 8.0 and type(cfg.proposals.min_size) is float
    assert cfg.synthetic.num_trainval == RAW["synthetic"]["num_trainval"]


def test_copy_of_real_params_loads_identically(tmp_path: Path) -> None:
    assert load_config(_write(tmp_path, RAW)) == load_config(REAL)


def test_sections_are_frozen() -> None:
    cfg = load_config(REAL)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.data.root = "elsewhere"  # type: ignore[misc]


def test_config_error_is_a_pipeline_error() -> None:
    assert issubclass(ConfigError, PipelineError)


def test_unknown_key(tmp_path: Path) -> None:
    message = _error(_modified(tmp_path, "data", "clases", ["cat"]))
    assert "data" in message
    assert "unknown key(s) ['clases']" in message


def test_unknown_section(tmp_path: Path) -> None:
    raw = copy.deepcopy(RAW)
    raw["trainer"] = {"epochs": 1}
    assert "unknown key(s) ['trainer']" in _error(_write(tmp_path, raw))


def test_missing_key(tmp_path: Path) -> None:
    raw = copy.deepcopy(RAW)
    del raw["proposals"]["seed"]
    message = _error(_write(tmp_path, raw))
    assert f"{tmp_path / 'params.yaml'}:proposals: missing key(s) ['seed']" in message


def test_missing_section(tmp_path: Path) -> None:
    raw = copy.deepcopy(RAW)
    del raw["runtime"]
    assert "missing key(s) ['runtime']" in _error(_write(tmp_path, raw))


def test_string_for_int(tmp_path: Path) -> None:
    message = _error(_modified(tmp_path, "synthetic", "seed", "0"))
    assert "synthetic:seed: expected int, got '0'" in message


def test_bool_for_int(tmp_path: Path) -> None:
    message = _error(_modified(tmp_path, "runtime", "num_workers", True))
    assert "runtime:num_workers: expected int, got True" in message


def test_float_for_int(tmp_path: Path) -> None:
    message = _error(_modified(tmp_path, "proposals", "max_boxes", 2000.0))
    assert "proposals:max_boxes: expected int, got 2000.0" in message


def test_int_accepted_for_float(tmp_path: Path) -> None:
    cfg = load_config(_modified(tmp_path, "proposals", "sigma", 1))
    assert cfg.proposals.sigma == 1.0
    assert type(cfg.proposals.sigma) is float


def test_bool_for_float(tmp_path: Path) -> None:
    message = _error(_modified(tmp_path, "proposals", "sigma", False))
    assert "proposals:sigma: expected float, got False" in message


def test_int_for_string(tmp_path: Path) -> None:
    message = _error(_modified(tmp_path, "data", "train_split", 7))
    assert "data:train_split: expected str, got 7" in message


def test_bad_literal(tmp_path: Path) -> None:
    message = _error(_modified(tmp_path, "proposals", "mode", "slow"))
    assert "proposals:mode: 'slow' is not one of ['fast', 'quality']" in message


def test_bad_on_error_literal(tmp_path: Path) -> None:
    message = _error(_modified(tmp_path, "data", "on_error", "ignore"))
    assert "data:on_error: 'ignore' is not one of ['raise', 'skip']" in message


def test_classes_list_becomes_tuple(tmp_path: Path) -> None:
    cfg = load_config(_modified(tmp_path, "data", "classes", ["dog", "cat"]))
    assert cfg.data.classes == ("dog", "cat")


def test_classes_item_of_wrong_type(tmp_path: Path) -> None:
    message = _error(_modified(tmp_path, "data", "classes", ["cat", 3]))
    assert "data:classes[1]: expected str, got 3" in message


def test_classes_not_a_list(tmp_path: Path) -> None:
    message = _error(_modified(tmp_path, "data", "classes", "cat"))
    assert "data:classes: expected a list, got 'cat'" in message


def test_bbox_feature_scale_params_are_read(tmp_path: Path) -> None:
    assert load_config(REAL).bbox == BboxParams(min_iou=0.6, ridge_lambda=1000.0, target_norm=20.0,
                                                norm_sample=10000, seed=0)
    raw = copy.deepcopy(RAW)
    raw["bbox"].update(target_norm=5, norm_sample=300, seed=7)
    bbox = load_config(_write(tmp_path, raw)).bbox
    assert (bbox.target_norm, bbox.norm_sample, bbox.seed) == (5.0, 300, 7) and type(bbox.target_norm) is float


@pytest.mark.parametrize("key,value,error", [
    ("target_norm", "20", "bbox:target_norm: expected float, got '20'"),
    ("target_norm", True, "bbox:target_norm: expected float, got True"),
    ("norm_sample", 10000.0, "bbox:norm_sample: expected int, got 10000.0"),
    ("seed", False, "bbox:seed: expected int, got False"),
    ("target_norm", 0.0, "bbox: need target_norm > 0 and norm_sample >= 1, got 0.0, 10000"),
    ("norm_sample", 0, "bbox: need target_norm > 0 and norm_sample >= 1, got 20.0, 0"),
    ("norm_seed", 0, "bbox: unknown key(s) ['norm_seed']"),
])
def test_bad_bbox_feature_scale_params(tmp_path: Path, key: str, value: Any, error: str) -> None:
    assert error in _error(_modified(tmp_path, "bbox", key, value))


def test_bbox_feature_scale_params_are_required(tmp_path: Path) -> None:
    raw = copy.deepcopy(RAW)
    for key in ("target_norm", "norm_sample", "seed"):
        del raw["bbox"][key]
    assert "bbox: missing key(s) ['target_norm', 'norm_sample', 'seed']" in _error(_write(tmp_path, raw))


@pytest.mark.parametrize("shards", [[0, 2], [], [1], [1, 0]])
def test_bad_shards(tmp_path: Path, shards: list[int]) -> None:
    message = _error(_modified(tmp_path, "sharding", "shards", shards))
    assert f":sharding: sharding.shards must be [0, 1, ..., N-1], got {shards}" in message


def test_good_shards(tmp_path: Path) -> None:
    cfg = load_config(_modified(tmp_path, "sharding", "shards", [0, 1, 2, 3]))
    assert cfg.sharding.num_shards == 4


def test_sharding_params_checked_on_construction() -> None:
    with pytest.raises(ConfigError, match=r"got \[0, 2\]"):
        ShardingParams((0, 2))


def test_top_level_not_a_mapping(tmp_path: Path) -> None:
    message = _error(_write(tmp_path, [1, 2, 3]))
    assert message == f"{tmp_path / 'params.yaml'}: expected a mapping, got list"


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("")
    assert _error(path) == f"{path}: expected a mapping, got NoneType"


def test_section_not_a_mapping(tmp_path: Path) -> None:
    raw = copy.deepcopy(RAW)
    raw["data"] = "features_cache/synthetic"
    assert _error(_write(tmp_path, raw)) == f"{tmp_path / 'params.yaml'}:data: expected a mapping, got str"


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    assert _error(path) == f"{path}: parameter file not found"


def test_invalid_yaml(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("data: [unclosed\n")
    assert _error(path).startswith(f"{path}: not valid YAML")


def test_as_dict_is_plain_json_data() -> None:
    data = dataclasses.replace(load_config(REAL).data, root="r", train_split="a", test_split="b", classes=("x", "y"))
    assert as_dict(data) == {
        "classes": ["x", "y"],
        "coco_test_annotations": "",
        "coco_test_images": "",
        "coco_train_annotations": "",
        "coco_train_images": "",
        "format": "voc",
        "on_error": "raise",
        "root": "r",
        "split": "files",
        "split_seed": 0,
        "test_fraction": 0.25,
        "test_split": "b",
        "train_split": "a",
    }


def test_recipes_split_into_feature_recipes_and_the_fast_rcnn_models_they_need(tmp_path: Path) -> None:
    path = _modified(tmp_path, "detect", "recipes", ["fast_rcnn_ohem_svd", "rcnn", "fast_rcnn_svd", "fast_rcnn"])
    detect = load_config(path).detect
    assert detect.feature_recipes == ("rcnn",)
    assert detect.fast_rcnn_models == detect.fast_rcnn_detectors == ("fast_rcnn_ohem", "fast_rcnn")
    assert detect.fast_rcnn_feature_models == ()


def test_fast_rcnn_svm_is_a_feature_recipe_cached_from_the_fast_rcnn_model(tmp_path: Path) -> None:
    assert trained_model("fast_rcnn_svm") == trained_model("fast_rcnn_svd") == "fast_rcnn"
    assert trained_model("sppnet") == "sppnet"
    detect = load_config(_modified(tmp_path, "detect", "recipes", ["fast_rcnn_svm", "rcnn"])).detect
    assert detect.feature_recipes == ("fast_rcnn_svm", "rcnn")
    assert detect.fast_rcnn_models == detect.fast_rcnn_feature_models == ("fast_rcnn",)  # trained, then cached
    assert detect.fast_rcnn_detectors == ()  # fast_rcnn_detect has nothing to do
    detect = load_config(_modified(tmp_path, "detect", "recipes", ["fast_rcnn_svm", "fast_rcnn_svd"])).detect
    assert detect.fast_rcnn_models == detect.fast_rcnn_detectors == detect.fast_rcnn_feature_models == ("fast_rcnn",)


@pytest.mark.parametrize("scorer, svm_recipes", [("svm", {"rcnn", "sppnet", "fast_rcnn_svm"}), ("softmax", set())])
def test_scores_are_svm_margins_only_for_feature_recipes_with_the_svm_scorer(tmp_path: Path, scorer: str,
                                                                            svm_recipes: set[str]) -> None:
    cfg = load_config(_modified(tmp_path, "detect", "scorer", scorer))
    kinds = {recipe: cfg.detect.score_kind(recipe) for recipe in RECIPES}
    assert {recipe for recipe, kind in kinds.items() if kind == "svm"} == svm_recipes
    assert set(kinds.values()) <= {"svm", "probability"}
    evaluate = cfg.evaluate
    assert (evaluate.lowest_drawn("svm"), evaluate.lowest_drawn("probability")) == (
        RAW["evaluate"]["gallery_score"], RAW["evaluate"]["gallery_probability"])


def test_faster_rcnn_detections_take_their_own_nms_and_everything_else_from_detect(tmp_path: Path) -> None:
    cfg = load_config(_modified(tmp_path, "faster_rcnn", "detection_nms_iou", 0.45))
    detect = cfg.faster_rcnn.detection_params(cfg.detect)
    assert detect.nms_iou == 0.45 != cfg.detect.nms_iou
    assert dataclasses.replace(detect, nms_iou=cfg.detect.nms_iou) == cfg.detect


@pytest.mark.parametrize("value", [0.0, 1.5])
def test_faster_rcnn_detection_nms_is_an_iou(tmp_path: Path, value: float) -> None:
    assert "0 < detection_nms_iou <= 1" in _error(_modified(tmp_path, "faster_rcnn", "detection_nms_iou", value))


@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_gallery_probability_is_a_probability(tmp_path: Path, value: float) -> None:
    path = _modified(tmp_path, "evaluate", "gallery_probability", value)
    assert "gallery_probability must be in [0, 1]" in _error(path)


@pytest.mark.parametrize("key, value, error", [
    ("svd_ranks", [256], "svd_ranks must be"),
    ("bg_iou_low", 0.6, "bg_iou_low < fg_iou"),
    ("target_stds", [0.1, 0.1, 0.2], "4 values each"),
    ("max_side", 500, "max_side >= every scale"),
    ("ohem_nms", 0.0, "ohem_nms"),
])
def test_bad_fast_rcnn_params(tmp_path: Path, key: str, value: Any, error: str) -> None:
    assert error in _error(_modified(tmp_path, "fast_rcnn", key, value))


@pytest.mark.parametrize("section, key, value, error", [
    ("finetune", "epochs", 0, "epochs > 0"),
    ("sppnet", "max_iterations", 0, "max_iterations >= 1"),
    ("fast_rcnn", "lr_drop", 0.0, "0 < lr_drop <= 1"),
    ("fast_rcnn", "lr_drop", 1.5, "0 < lr_drop <= 1"),
    ("fast_rcnn", "warmup", -1, "warmup must be at least 0"),
    ("finetune", "average_last", -0.1, "average_last must be between 0 and 1"),
    ("finetune", "average_last", 1.5, "average_last must be between 0 and 1"),
    ("finetune", "learning_rate", 0.0, "learning_rate > 0"),
    ("svm", "C_positives", -1, "C_positives must be 0 (one C for every class) or positive"),
])
def test_bad_training_schedules(tmp_path: Path, section: str, key: str, value: Any, error: str) -> None:
    assert error in _error(_modified(tmp_path, section, key, value))


@pytest.mark.parametrize("section, key, value", [
    ("finetune", "positive_fraction", 1.5), ("finetune", "fg_iou", 0.0), ("sppnet", "positive_fraction", -0.1),
    ("sppnet", "fg_iou", 1.2),
])
def test_bad_window_sampling(tmp_path: Path, section: str, key: str, value: float) -> None:
    assert "need 0 <= positive_fraction <= 1 and 0 < fg_iou <= 1" in _error(_modified(tmp_path, section, key, value))


def test_bad_rpn_step_schedule(tmp_path: Path) -> None:
    raw = copy.deepcopy(RAW)
    raw["faster_rcnn"]["step4"]["epochs"] = -1.0
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert "faster_rcnn:step4: need epochs > 0" in _error(path)


def test_an_svd_recipe_needs_svd_ranks(tmp_path: Path) -> None:
    raw = copy.deepcopy(RAW)
    raw["fast_rcnn"]["svd_ranks"] = []
    raw["detect"]["recipes"] = ["fast_rcnn", "fast_rcnn_svd"]
    assert "svd_ranks is [] (no compression)" in _error(_write(tmp_path, raw))
    raw["detect"]["recipes"] = ["fast_rcnn"]
    assert load_config(_write(tmp_path, raw)).fast_rcnn.svd_ranks == ()


def test_unknown_recipe(tmp_path: Path) -> None:
    assert "is not one of" in _error(_modified(tmp_path, "detect", "recipes", ["fastest_rcnn"]))


def test_data_defaults_read_a_voc_folder_with_split_files() -> None:
    data = load_config(REAL).data
    assert (data.format, data.split) == ("voc", "files")


@pytest.mark.parametrize("changes, error", [
    ({"test_fraction": 1.0}, "test_fraction must be between 0 and 1"),
    ({"test_fraction": 0}, "test_fraction must be between 0 and 1"),
    ({"split": "auto", "test_split": "trainval"}, "split: auto needs format: voc"),
    ({"split": "auto", "format": "coco", "coco_train_annotations": "a.json", "coco_test_annotations": "b.json"},
     "split: auto needs format: voc"),
    ({"format": "coco", "coco_train_annotations": "a.json"}, "format: coco needs coco_train_annotations and"),
    ({"coco_test_images": "/data/images"}, "coco_test_images must be a path inside root"),
    ({"coco_train_annotations": "../a.json"}, "coco_train_annotations must be a path inside root"),
    ({"split": "hash"}, "'hash' is not one of ['files', 'auto']"),
])
def test_bad_data_params(tmp_path: Path, changes: dict, error: str) -> None:
    raw = copy.deepcopy(RAW)
    raw["data"].update(changes)
    assert error in _error(_write(tmp_path, raw))


def test_coco_files_per_split() -> None:
    data = dataclasses.replace(load_config(REAL).data, format="coco", coco_train_annotations="a.json",
                               coco_train_images="train", coco_test_annotations="b.json", coco_test_images="")
    assert data.coco_files == {"trainval": ("a.json", "train"), "test": ("b.json", "")}
    assert dataclasses.replace(data, test_split="trainval").coco_files == {"trainval": ("a.json", "train")}

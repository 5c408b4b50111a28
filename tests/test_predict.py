"""``python -m stages predict``: the inputs it accepts and the clear errors before any model is there.

That its detections equal the pipeline's own on the test split's images is
checked end to end, on the tiny DAG both orchestrators ran, in
``test_pipeline.py``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import project_copy, run_to_end, tiny_params
from PIL import Image

from stages.core.errors import PipelineError
from stages.tools.predict import image_files


def _image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((40, 60, 3), 128, np.uint8)).save(path)
    return path


def test_folders_are_searched_recursively_for_images_and_files_are_taken_as_given(tmp_path):
    a, b = _image(tmp_path / "in" / "a.jpg"), _image(tmp_path / "in" / "deep" / "b.PNG")
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    c = _image(tmp_path / "c.webp")
    assert image_files([tmp_path / "in", c]) == [a, b, c]


@pytest.mark.parametrize("make, message", [
    (lambda d: [d / "missing.jpg"], "no such file or folder"),
    (lambda d: [(d / "empty").mkdir() or d / "empty"], "no image files"),
    (lambda d: [_image(d / "x" / "same.jpg"), _image(d / "y" / "same.png")], "share the name 'same'"),
])
def test_bad_inputs_are_clear_errors(tmp_path, make, message):
    with pytest.raises(PipelineError, match=message):
        image_files(make(tmp_path))


@pytest.fixture(scope="module")
def fresh_project(tmp_path_factory) -> Path:
    """A project in which nothing has run yet; recipes rcnn and fast_rcnn only."""
    params = tiny_params()
    params["detect"]["recipes"] = ["rcnn", "fast_rcnn"]
    folder = project_copy(tmp_path_factory.mktemp("predict") / "project", params)
    _image(folder / "new" / "photo.jpg")
    return folder


@pytest.mark.parametrize("recipe, stages", [
    ("fast_rcnn", "`dvc repro fast_rcnn_train@fast_rcnn`"),
    ("rcnn", "`dvc repro finetune svm@rcnn bbox@rcnn`"),
])
def test_a_missing_model_names_the_stages_to_run(fresh_project, recipe, stages):
    result = run_to_end(["python", "-m", "stages", "predict", "--recipe", recipe, "new"], fresh_project)
    assert result.returncode == 1
    assert f"recipe {recipe}: the models it needs are missing or out of date" in result.stderr
    assert stages in result.stderr
    assert "Traceback" not in result.stderr


def test_a_recipe_the_project_does_not_run_is_a_clear_error(fresh_project):
    result = run_to_end(["python", "-m", "stages", "predict", "--recipe", "sppnet", "new/photo.jpg"], fresh_project)
    assert result.returncode == 1
    assert "recipe sppnet: features_cache/spp/head.pt: no stage writes it under params.yaml" in result.stderr
    assert "detect.recipes" in result.stderr

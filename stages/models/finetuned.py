"""The fine-tuned network the ``finetune`` stage writes and the ``features`` stage reads."""
from __future__ import annotations

from pathlib import Path

import torch

from stages.core.store import ArtifactError
from stages.models.backbones import Backbone, build_backbone
from stages.models.batch_norms import bake_folded_weights, fold_batch_norms


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> Backbone:
    """The fine-tuned :class:`Backbone` saved by :func:`run`, in eval mode, with ``input_size`` and ``padding`` set,
    its batch norms folded into the convs and the folded weights computed once (for test time).

    The file's ``classes`` (without background; logits are ``len(classes) + 1``-way,
    0 = background) stay available as ``model.classes``.
    """
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: model file not found (run the finetune stage first)")
    try:
        saved = torch.load(path, map_location=map_location, weights_only=True)
        model = fold_batch_norms(build_backbone(saved["arch"], "random", saved["num_classes"]))
        model.load_state_dict(saved["state_dict"], strict=True)
        bake_folded_weights(model)
    except (KeyError, RuntimeError, OSError, ValueError) as exc:
        raise ArtifactError(f"{path}: not a fine-tuned model file of this pipeline ({exc})") from None
    model.input_size = int(saved["input_size"])
    model.padding = int(saved["padding"])
    model.mean, model.std = tuple(saved["mean"]), tuple(saved["std"])
    model.classes = list(saved["classes"])
    return model.eval()

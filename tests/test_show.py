from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from stages import proposals
from stages.core import layout
from stages.core.errors import PipelineError
from stages.tools import show


def test_show_draws_ground_truth_and_proposals(workspace, tiny_config):
    split = tiny_config.data.test_split
    proposals.run(tiny_config.proposals, "raise", split, 0, 1, layout.proposals_shard(split, 0), num_workers=1)
    out = show.run(tiny_config.data.splits, 1, "syn_000007", None, num_proposals=20)
    assert out == layout.CACHE / "show" / "syn_000007.png"
    drawn = np.asarray(Image.open(out).convert("RGB")).astype(int)
    lime = (drawn[..., 1] > 200) & (drawn[..., 0] < 60) & (drawn[..., 2] < 60)
    yellow = (drawn[..., 0] > 200) & (drawn[..., 1] > 200) & (drawn[..., 2] < 60)
    assert lime.sum() > 100 and yellow.sum() > 100


def test_show_without_proposals_and_unknown_image(workspace, tiny_config):
    out = show.run(tiny_config.data.splits, 1, "syn_000000", workspace / "a.png", num_proposals=5)
    assert out.is_file()
    with pytest.raises(PipelineError, match="nope"):
        show.run(tiny_config.data.splits, 1, "nope", None, num_proposals=5)

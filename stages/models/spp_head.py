"""SPP-net's fc layers on cached pyramids: what ``spp_finetune`` trains and ``spp_recache`` reads."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from stages.core.store import ArtifactError


class SppHead(nn.Module):
    """SPP-net's fc6, fc7 (``hidden``, for the SVMs) and fc8 (``num_outputs`` logits, 0 = background).

    Every method takes raw cached pyramids ``(N, pool_dim)`` (any float dtype)
    and applies ``feature_scale`` itself.
    """

    def __init__(self, pool_dim: int, hidden: int, num_outputs: int, dropout: float, feature_scale: float = 1.0):
        super().__init__()
        self.pool_dim, self.fc_dim = pool_dim, hidden
        self.register_buffer("feature_scale", torch.tensor(feature_scale, dtype=torch.float32))
        self.hidden = nn.Sequential(
            nn.Linear(pool_dim, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),  # fc6
            nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),  # fc7
        )
        self.classifier = nn.Linear(hidden, num_outputs)  # fc8
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def fc7(self, pool: Tensor) -> Tensor:
        """``(N, pool_dim)`` -> ``(N, hidden)`` fc7 features (after ReLU)."""
        return self.hidden(pool.float() * self.feature_scale)

    def forward(self, pool: Tensor) -> Tensor:
        """``(N, pool_dim)`` -> ``(N, C + 1)`` logits."""
        return self.classifier(self.fc7(pool))

    def scores(self, pool: Tensor) -> Tensor:
        """``(N, pool_dim)`` -> ``(N, C + 1)`` softmax probabilities, column 0 = background."""
        return torch.softmax(self(pool), dim=1)


def load_head(path: str | Path, map_location: str | torch.device = "cpu") -> SppHead:
    """The :class:`SppHead` saved by :func:`run`, in eval mode, with ``classes`` and ``levels`` set."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: head file not found (run the spp_finetune stage first)")
    try:
        saved = torch.load(path, map_location=map_location, weights_only=True)
        head = SppHead(saved["pool_dim"], saved["hidden"], saved["num_classes"], saved["dropout"])
        head.load_state_dict(saved["state_dict"], strict=True)
    except (KeyError, RuntimeError, OSError, ValueError) as exc:
        raise ArtifactError(f"{path}: not an SPP-net head file of this pipeline ({exc})") from None
    head.classes = list(saved["classes"])
    head.levels = tuple(saved["levels"])
    return head.eval()

"""The three contrastive objectives of dual-encoder training, each with its learnable scale.

    clip    symmetric InfoNCE over the batch (Radford et al. 2021), learnable temperature
    align   ALIGN's normalised softmax (Jia et al. 2021): the same two softmaxes, with optional
            label smoothing, which the paper uses against its noisy alt-text pairs
    siglip  pairwise sigmoid loss with a learnable bias (Zhai et al. 2023): no batch-wide
            softmax, so it needs no global normalisation and suits small batches

Each loss takes L2-normalised image and text features of matched rows and owns its parameters
(`logit_scale`, and `logit_bias` for SigLIP), so the trainer treats them like any other module.

    loss_fn = make_loss("siglip")
    loss = loss_fn(image_features, text_features)
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

#: the largest logit scale any loss may reach (CLIP clamps at 100 for stability)
MAX_LOGIT_SCALE = 100.0


class ContrastiveLoss(nn.Module):
    """Base: a learnable log-scale, clamped after each optimiser step via `clamp_()`."""

    def __init__(self, init_scale: float) -> None:
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(init_scale)))

    @property
    def temperature(self) -> float:
        return 1.0 / self.logit_scale.exp().item()

    @torch.no_grad()
    def clamp_(self) -> None:
        self.logit_scale.clamp_(0.0, math.log(MAX_LOGIT_SCALE))

    def logits(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """(n, d), (n, d) unit rows -> (n, n) scaled similarities, image rows by text columns."""
        return self.logit_scale.exp() * image.float() @ text.float().T


class ClipLoss(ContrastiveLoss):
    """Mean of image->text and text->image cross-entropy; row i's positive is column i."""

    def __init__(self, init_temperature: float = 0.07) -> None:
        super().__init__(1.0 / init_temperature)

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        logits = self.logits(image, text)
        labels = torch.arange(len(logits), device=logits.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


class AlignLoss(ClipLoss):
    """ALIGN's normalised softmax: the CLIP objective with label smoothing on both directions."""

    def __init__(self, init_temperature: float = 0.07, label_smoothing: float = 0.1) -> None:
        super().__init__(init_temperature)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = label_smoothing

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        logits = self.logits(image, text)
        labels = torch.arange(len(logits), device=logits.device)
        smooth = self.label_smoothing
        return (F.cross_entropy(logits, labels, label_smoothing=smooth)
                + F.cross_entropy(logits.T, labels, label_smoothing=smooth)) / 2


class SigLipLoss(ContrastiveLoss):
    """Every (image, text) cell is a binary match / no-match decision; summed, divided by n.

    Initialised as in the paper (scale 10, bias -10) so that the many negatives start near
    zero loss instead of dominating the first steps.
    """

    def __init__(self, init_scale: float = 10.0, init_bias: float = -10.0) -> None:
        super().__init__(init_scale)
        self.logit_bias = nn.Parameter(torch.tensor(float(init_bias)))

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        logits = self.logits(image, text) + self.logit_bias
        signs = 2 * torch.eye(len(logits), device=logits.device) - 1
        return -F.logsigmoid(signs * logits).sum() / len(logits)


LOSSES: dict[str, type[ContrastiveLoss]] = {"clip": ClipLoss, "align": AlignLoss, "siglip": SigLipLoss}


def make_loss(name: str, label_smoothing: float = 0.1) -> ContrastiveLoss:
    """A fresh loss by name: "clip", "align" (uses `label_smoothing`) or "siglip"."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; known: {sorted(LOSSES)}")
    if name == "align":
        return AlignLoss(label_smoothing=label_smoothing)
    return LOSSES[name]()

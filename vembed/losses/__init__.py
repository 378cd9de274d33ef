"""Embedding losses with one call shape, a registry, ``LossFactory`` and the distributed gather.

``loss(query, positive, negatives=None, labels=None, ...)`` or ``loss(outputs, batch)``; see
:mod:`vembed.losses.base`. Built-in names: infonce, sigmoid, triplet, cosent, hard_mining, maxsim,
distillation (``MatryoshkaLoss`` wraps any of them).
"""

from vembed.losses.base import EmbeddingLoss, LossInputs
from vembed.losses.registry import UnknownLossError, available_losses, get_loss_class, register_loss

# Importing the loss modules registers them (base and registry must come first).
from vembed.losses.infonce import InfoNCELoss  # isort: skip
from vembed.losses.cosent import CoSENTLoss  # isort: skip
from vembed.losses.distillation import DistillationLoss  # isort: skip
from vembed.losses.hard_mining import HardMiningLoss  # isort: skip
from vembed.losses.matryoshka import MatryoshkaLoss  # isort: skip
from vembed.losses.maxsim import MaxSimLoss  # isort: skip
from vembed.losses.sigmoid import SigmoidLoss  # isort: skip
from vembed.losses.triplet import TripletLoss  # isort: skip
from vembed.losses.distributed import all_gather_with_grad, average_gradients, gather_with_grad  # isort: skip
from vembed.losses.factory import LossFactory  # isort: skip

__all__ = [
    "CoSENTLoss",
    "DistillationLoss",
    "EmbeddingLoss",
    "HardMiningLoss",
    "InfoNCELoss",
    "LossFactory",
    "LossInputs",
    "MatryoshkaLoss",
    "MaxSimLoss",
    "SigmoidLoss",
    "TripletLoss",
    "UnknownLossError",
    "all_gather_with_grad",
    "available_losses",
    "average_gradients",
    "gather_with_grad",
    "get_loss_class",
    "register_loss",
]

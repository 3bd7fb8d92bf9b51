"""Objectives beyond flow matching, one a module, each registered in
:data:`flowmatch.training.objectives.OBJECTIVES` when imported (``import flowmatch`` imports them):
consistency distillation and training (:mod:`flowmatch.distill.consistency`: ``cd``, ``ct``)."""

from flowmatch.distill.consistency import ConsistencyDistillation, ConsistencyTraining, consistency_fn, ct_intervals

__all__ = ["ConsistencyDistillation", "ConsistencyTraining", "consistency_fn", "ct_intervals"]

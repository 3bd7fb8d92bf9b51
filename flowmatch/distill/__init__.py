"""Objectives beyond flow matching, one a module, and their adapters (layer L5: imports training,
models, config, io). Importing this package (``import flowmatch`` does) registers them:

- :mod:`flowmatch.distill.consistency`: consistency distillation and training (objectives ``cd``,
  ``ct`` of :data:`flowmatch.training.objectives.OBJECTIVES`);
- :mod:`flowmatch.distill.adversarial`: adversarial post-training of a one-step generator (objective
  ``apt``);
- :mod:`flowmatch.distill.shortcut`: shortcut models (objective ``shortcut``, Frans et al. 2025) and
  :mod:`flowmatch.distill.meanflow`: MeanFlow (objective ``meanflow``, Geng et al. 2025), any-step models
  of the average velocity ``u(x, t, h)`` on a model with a step input (``model.step_input``), sampled in
  any number of steps by :func:`~flowmatch.distill.anystep.sample_anystep`;
- :mod:`flowmatch.distill.adapters`: LoRA adapters through peft (imported lazily): train an adapter on a
  base checkpoint's weights (``lora.rank > 0``), save it alone with its provenance, load it onto its
  base, compose several with weights, merge them into a full checkpoint (registers the ``lora`` hook of
  :func:`~flowmatch.training.builders.build_components`).
"""

from flowmatch.distill import adapters
from flowmatch.distill.adversarial import AdversarialPostTraining
from flowmatch.distill.anystep import ANYSTEP_FAMILIES, check_anystep_config, sample_anystep
from flowmatch.distill.consistency import ConsistencyDistillation, ConsistencyTraining, consistency_fn, ct_intervals
from flowmatch.distill.meanflow import MeanFlow, adaptive_weight, meanflow_target, meanflow_times
from flowmatch.distill.shortcut import Shortcut, shortcut_target

__all__ = ["adapters", "AdversarialPostTraining", "ConsistencyDistillation", "ConsistencyTraining", "consistency_fn",
           "ct_intervals", "ANYSTEP_FAMILIES", "check_anystep_config", "sample_anystep", "MeanFlow", "adaptive_weight",
           "meanflow_target", "meanflow_times", "Shortcut", "shortcut_target"]

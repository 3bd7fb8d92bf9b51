"""Objectives beyond flow matching and their adapters (layer L5: imports training, models, config, io).

:mod:`flowmatch.distill.adapters`: LoRA adapters through peft (imported lazily): train an adapter on a
base checkpoint's weights (``lora.rank > 0``), save it alone with its provenance, load it onto its
base, compose several with weights, merge them into a full checkpoint. Importing this package
registers the ``lora`` hook of :func:`~flowmatch.training.builders.build_components`.
"""

from flowmatch.distill import adapters

__all__ = ["adapters"]

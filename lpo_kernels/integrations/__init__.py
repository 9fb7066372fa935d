"""Trainer adapters. Each submodule imports its trainer lazily, so importing
``lpo_kernels.integrations`` never needs TRL or verl:

- ``lpo_kernels.integrations.trl``: ``LPOConfig`` / ``LPOTrainer`` (needs ``trl``).
- ``lpo_kernels.integrations.verl``: verl policy losses ``lpo_fwd``, ``lpo_rev``, ``lpo_js``,
  ``lpo_alpha`` (registered in verl when it imports, with the mini-batch pre-pass of
  ``verl_minibatch`` that keeps them exact wherever verl puts the rows).
"""

__all__ = ["trl", "verl"]

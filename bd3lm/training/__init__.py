"""The training layer: the Lightning module, data module, callbacks, checkpoints and run management.

Only this package, ``train.py`` and ``configs/`` know Lightning and Hydra; the core (``bd3lm``) and the data
layer (``bd3lm.data``) do not.
"""

"""Training Unified-IO: the LightningModule, the paper's optimiser and schedule, distributed
strategies, crash-safe checkpoints and the export to the inference format.

Lightning and Hydra are imported by the submodules only, so ``import uio`` stays light.
"""

"""DELTA's supervised channel attention, in one package.

- :mod:`.scores`: the scores (how much the loss of an L2-FE model rises when a channel is zeroed; exact,
  naive and first-order), their normalisation into weights, and their files (deltatl's and the
  official format).
- :mod:`.estimate`: the official procedure for a run (the L2-FE fit, then scoring), resumable, and the
  cache of raw scores shared by every run with the same weights, images, layers and settings.
"""
from .estimate import (OFFICIAL_EPOCHS_PER_TENTH, AttentionSettings, cache_key, cached_channel_attention,
                       estimate_channel_attention, fit_linear_probe, layer_channels)
from .scores import (FORMAT, METHODS, channel_attention_scores, check_replaceable_scores, normalize_scores,
                     read_scores, write_scores)

__all__ = ["FORMAT", "AttentionSettings", "METHODS", "OFFICIAL_EPOCHS_PER_TENTH", "cache_key", "cached_channel_attention",
           "channel_attention_scores", "check_replaceable_scores", "estimate_channel_attention", "fit_linear_probe",
           "layer_channels",
           "normalize_scores", "read_scores", "write_scores"]

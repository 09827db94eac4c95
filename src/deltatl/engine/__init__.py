"""The training engine: the objective a method trains, and the loop that trains it.

- :mod:`.objective`: ``Objective``, cross-entropy plus a method's weighted regularizer terms, and the
  frozen source network when a term reads its feature maps.
- :mod:`.fit`: ``fit()``, the one training loop (epochs, schedule, evaluation, checkpoints, exact
  resume, DDP, AMP); ``train_step`` is one step of it.
- :mod:`.hooks`: step hooks, what changes steps without being part of the loss; :mod:`.rifle` (RIFLE)
  and :mod:`.tricks` (DisturbLabel, head Dropout / DropConnect, Stochastic Depth) provide them.
- :mod:`.schedule`, :mod:`.checkpoint`, :mod:`.evaluate`: learning rates, checkpoint files and RNG
  state, evaluation (10-crop included).
"""

"""A two-stage miniature of RMT (one axial and one whole-attention stage with layer scale) on
the digits at 16x16, a batch of 8: what the tests train for a few steps (its train step
compiles in ~12 s on XLA:CPU with --xla_backend_optimization_level=0, ~30 s without).

Run:
  python main.py --config configs/tiny_test.py --workdir /tmp/rmt_tiny_test
"""

import ml_collections

from configs import demo


def get_config() -> ml_collections.ConfigDict:
  c = demo.get_config()
  c.model = 'rmt_tiny'
  c.model_overrides = ml_collections.ConfigDict(dict(
      embed_dims=(8, 16), depths=(1, 1), num_heads=(2, 2), init_values=(2, 2),
      heads_ranges=(4, 4), mlp_ratios=(2, 2), axial=(True, False), layerscales=(False, True),
      projection=16))
  c.remat = (False, False)
  c.data.image_size = 16
  c.global_batch_size = 8
  c.eval_batch_size = 120
  c.total_steps = 4
  c.log_every_steps = 1
  c.checkpoint_every_steps = 2
  c.checkpoint_every_epoch = False
  c.eval_every_epochs = 1000  # Only at the end.
  c.max_to_keep = 5
  return c

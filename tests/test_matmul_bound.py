"""benchmarks.matmul_bound: the products it finds are the model's, and the command runs."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np

from rmt_jax import bench
from rmt_jax.analysis import counting
from rmt_jax.models import create_model


def _flops(products):
  return sum(p['flops'] * p['count'] for p in products)


def test_products_are_the_forward_macs_and_three_times_them_in_training():
  from benchmarks import matmul_bound  # pylint: disable=g-import-not-at-top
  # Depthwise convs as convolutions, so that every MAC `summary` counts is a product here.
  model = create_model('rmt_tiny', kernels='xla')
  images = jnp.zeros((2, 64, 64, 3))
  variables = bench.synthetic_variables(model, images)
  forward = matmul_bound.collect_products(model.apply, variables, images)
  assert _flops(forward) == 2 * counting.count_macs(model, 64, batch=2)

  step, state = bench.make_train_step(model, variables)
  targets = jax.nn.one_hot(np.arange(2), model.num_classes)
  train = matmul_bound.collect_products(step, state, images, targets)
  # Forward, input gradient and kernel gradient of each product cost the same, except that
  # nothing needs the images' gradient: the first conv has no input-gradient product.
  first_conv = [p for p in forward if p['op'] == 'conv_general_dilated'
                and p['shapes'][0] == [2, 64, 64, 3]]
  assert len(first_conv) == 1 and first_conv[0]['count'] == 1
  assert _flops(train) == 3 * _flops(forward) - first_conv[0]['flops']


def test_matmul_bound_command_prints_report_and_sane_json(tmp_path, capsys):
  from benchmarks import matmul_bound  # pylint: disable=g-import-not-at-top
  path = tmp_path / 'bound.json'
  assert matmul_bound.main(['--variant', 'rmt_tiny', '--mode', 'train', '--batch', '2',
                            '--resolution', '64', '--repeats', '1', '--step_repeats', '1',
                            '--top', '3', '--json', str(path)]) == 0
  report = capsys.readouterr().out
  assert 'bound:' in report and 'of the ceiling' in report
  result = json.loads(path.read_text())
  products = result['products']
  assert len(report.splitlines()) == 5 + 3
  totals = [p['seconds'] * p['count'] for p in products]
  assert totals == sorted(totals, reverse=True)
  assert all(p['seconds'] > 0 and p['flops'] > 0 and p['count'] >= 1 for p in products)
  bound = result['bound']
  assert math.isclose(bound['seconds'], sum(totals))
  assert math.isclose(bound['fraction_of_ceiling'],
                      result['step']['model_flops'] / bound['seconds']
                      / result['ceiling']['flops_per_s'])
  assert 0 < bound['share_of_step'] and 0 < bound['fraction_of_ceiling']


def test_matmul_bound_rejects_unknown_variants(capsys):
  from benchmarks import matmul_bound  # pylint: disable=g-import-not-at-top
  assert matmul_bound.main(['--variant', 'rmt_xl']) == 2
  assert 'rmt_tiny' in capsys.readouterr().err

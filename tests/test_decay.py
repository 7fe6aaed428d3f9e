"""The decay and rotary tables against the official buffers and their defining properties."""

import numpy as np
import pytest

from conftest import CASES, official_case, official_manifest
from rmt_jax.models import decay


@pytest.mark.parametrize('case', CASES)
def test_tables_equal_official_buffers_within_float32_rounding(case):
  ref = official_case(case)
  kw = ref['kwargs']
  for i, (dim, heads) in enumerate(zip(kw['embed_dims'], kw['num_heads'])):
    # The official buffers are float32 computations whose last bits depend on the device. One
    # float32 ulp of the linspace exponent (up to 2^-23 relative) becomes ln(10000) = 9.2 times
    # that in 10000 ** exponent: 1.1e-6 relative.
    np.testing.assert_allclose(decay.rotary_angles(dim // heads),
                               ref['state_dict'][f'layers.{i}.Relpos.angle'], rtol=1.1e-6, atol=0)
    np.testing.assert_array_max_ulp(
        decay.log_gamma(heads, kw['init_values'][i], kw['heads_ranges'][i]),
        ref['state_dict'][f'layers.{i}.Relpos.decay'], maxulp=2)


def test_manhattan_decay_is_the_sum_of_the_axial_decays():
  height, width, rates = 3, 5, (4, 2, 6)
  whole = decay.manhattan_decay(height, width, *rates).reshape(4, height, width, height, width)
  rows, cols = decay.axial_decay(height, *rates), decay.axial_decay(width, *rates)
  np.testing.assert_allclose(whole, rows[:, :, None, :, None] + cols[:, None, :, None, :],
                             rtol=1e-6)
  assert (np.diagonal(decay.manhattan_decay(height, width, *rates), axis1=1, axis2=2) == 0).all()
  assert (decay.log_gamma(*rates) < 0).all()


def test_rotary_positions_are_raster_order():
  sin, cos = decay.rotary_tables(3, 4, 8)
  angles = decay.rotary_angles(8)
  position = 2 * 4 + 3  # row 2, column 3
  np.testing.assert_allclose(sin[2, 3], np.sin(np.float32(position) * angles), rtol=1e-6)
  np.testing.assert_allclose(cos[2, 3], np.cos(np.float32(position) * angles), rtol=1e-6)
  assert (angles[0::2] == angles[1::2]).all()  # one frequency per interleaved pair


def test_manifest_buffer_shapes_follow_the_config():
  for name, entry in official_manifest().items():
    shapes = {k: tuple(s) for k, s, _ in entry['state_dict'] if '.Relpos.' in k}
    assert len(shapes) == 8, name

"""Shared test helpers: the official reference fixtures (tests/fixtures, see its README)."""

import json
import os
import pathlib

import jax
import numpy as np
import pytest

# XLA's CPU compiler spends ~15 s on the threefry generator of even the tiny model's init; the
# 'rbg' generator compiles in a fraction of that. No test depends on which generator runs.
jax.config.update('jax_default_prng_impl', 'rbg')

# The fixtures are part of the repository (tests/fixtures, with a README saying how each was
# made), so a clone tests itself; RMT_FIXTURES points the tests at another copy.
FIXTURES = pathlib.Path(os.environ.get('RMT_FIXTURES', pathlib.Path(__file__).parent / 'fixtures'))
CASES = ('a', 'b', 'tokenlabel')


def _require_fixtures() -> None:
  if not (FIXTURES / 'official_manifest.json').exists():
    # A missing reference is an error, not a skip: parity is what these tests are for.
    pytest.fail(f'official reference fixtures not found in {FIXTURES} '
                '(set RMT_FIXTURES to their folder)')


def official_case(case: str) -> dict:
  """One reference case: its official constructor kwargs, state_dict, input and outputs.

  Returns:
    {'kwargs': VisRetNet kwargs, 'state_dict': {key: array}, 'images': NHWC float32,
     'logits': (2, 10), 'features': {'stem', 'stage0'..'stage3': NHWC}}.
  """
  _require_fixtures()
  configs = json.loads((FIXTURES / 'official_tiny_configs.json').read_text())
  with np.load(FIXTURES / f'official_tiny_{case}.npz') as f:
    arrays = {k: f[k] for k in f.files}
  return {
      'kwargs': configs[f'official_tiny_{case}'],
      'state_dict': {k: v for k, v in arrays.items()
                     if k not in ('input', 'logits') and not k.startswith('feature.')},
      'images': arrays['input'].transpose(0, 2, 3, 1),
      'logits': arrays['logits'],
      'features': {k[len('feature.'):]: v for k, v in arrays.items() if k.startswith('feature.')},
  }


def official_manifest() -> dict:
  _require_fixtures()
  return json.loads((FIXTURES / 'official_manifest.json').read_text())


def relative_error(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def official_det_case() -> dict:
  """The detection backbone's reference (`official_tiny_det.npz`, the official mmdet `RMT`).

  Returns:
    {'kwargs': the official class's kwargs, 'state_dict': {key: array}, 'images': NHWC float32
     (2, 96, 160, 3), 'outputs': the four returned maps, transposed to NHWC}.
  """
  _require_fixtures()
  configs = json.loads((FIXTURES / 'official_tiny_configs.json').read_text())
  with np.load(FIXTURES / 'official_tiny_det.npz') as f:
    arrays = {k: f[k] for k in f.files}
  outputs = sorted((int(k.split('.')[1]), v) for k, v in arrays.items() if k.startswith('out.'))
  return {
      'kwargs': configs['official_tiny_det'],
      'state_dict': {k: v for k, v in arrays.items()
                     if k != 'input' and not k.startswith('out.')},
      'images': arrays['input'].transpose(0, 2, 3, 1),
      'outputs': tuple(v.transpose(0, 2, 3, 1) for _, v in outputs),
  }

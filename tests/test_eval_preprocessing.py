"""The evaluation preprocessing stored with weights (rmt_jax.data.eval_preprocessing): what a run's
config says, its round trip through a weights description (through a training checkpoint:
tests/test_checkpoint.py), the default for weights that store none, and overrides."""

import json

from absl import flags
import numpy as np
import pytest

from configs import common, demo, tiny_test
from rmt_jax.weights import checkpoint
from rmt_jax.data import eval_preprocessing
from rmt_jax.data.eval_preprocessing import EvalPreprocessing

pytest.importorskip('tensorflow', reason='the input pipeline, whose evaluation the description '
                                         'describes, needs TensorFlow')
from rmt_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top

DIGITS = EvalPreprocessing(image_size=32, crop_pct=1.0, interpolation='bilinear')


def test_a_config_gives_what_its_evaluation_does():
  assert eval_preprocessing.from_config(common.get_config().data) == eval_preprocessing.OFFICIAL
  assert eval_preprocessing.from_config(demo.get_config().data) == DIGITS
  assert eval_preprocessing.from_config(tiny_test.get_config().data).image_size == 16
  assert eval_preprocessing.OFFICIAL.to_metadata() == {
      'image_size': 224, 'crop_pct': 0.875, 'interpolation': 'bicubic',
      'mean': [0.485, 0.456, 0.406], 'std': [0.229, 0.224, 0.225]}


def test_round_trip_through_a_variables_directory(tmp_path):
  stored = EvalPreprocessing(image_size=48, crop_pct=0.9, interpolation='bilinear',
                             mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
  checkpoint.save_variables(tmp_path / 'w', {'params': {'w': np.zeros(2)}}, {
      'model': 'rmt_tiny', eval_preprocessing.METADATA_KEY: stored.to_metadata()})
  metadata = checkpoint.read_metadata(tmp_path / 'w')
  assert json.loads(json.dumps(metadata)) == metadata
  assert eval_preprocessing.from_metadata(metadata) == (stored, eval_preprocessing.STORED)


def test_weights_that_store_none_get_the_default():
  assert eval_preprocessing.from_metadata({'model': 'rmt_s'}) == (
      eval_preprocessing.OFFICIAL, eval_preprocessing.DEFAULT)
  assert eval_preprocessing.from_metadata({'model': 'rmt_s'}, default=DIGITS) == (
      DIGITS, eval_preprocessing.DEFAULT)
  # A partial description takes the rest from the default; a newer writer's fields are ignored.
  partial = {eval_preprocessing.METADATA_KEY: {'image_size': 32, 'resize_mode': 'squash'}}
  assert eval_preprocessing.from_metadata(partial)[0] == EvalPreprocessing(image_size=32)


def test_overrides_replace_only_what_they_name():
  metadata = {eval_preprocessing.METADATA_KEY: DIGITS.to_metadata()}
  assert eval_preprocessing.resolve(metadata, image_size=None) == (
      DIGITS, eval_preprocessing.STORED)
  got, origin = eval_preprocessing.resolve(metadata, 'the flags', image_size=64,
                                           interpolation='bicubic')
  assert got == EvalPreprocessing(image_size=64, crop_pct=1.0, interpolation='bicubic')
  assert origin == 'image_size, interpolation from the flags; the rest stored with the weights'
  assert eval_preprocessing.resolve({}, crop_pct=1.0)[1] == (
      'crop_pct from the caller; the rest the default for weights that store none')
  for bad, says in (({'interpolation': 'cubic'}, 'interpolation must be one of'),
                    ({'crop_pct': 0.0}, 'crop_pct in (0, 1]'),
                    ({'image_size': 0}, 'image_size must be at least 1')):
    with pytest.raises(ValueError, match=says.replace('(', r'\(').replace(']', r'\]')):
      eval_preprocessing.resolve(metadata, **bad)


def test_flags_override_only_what_is_given():
  options = flags.FlagValues()
  eval_preprocessing.add_flags(options)
  options(['predict', '--crop_pct=1', '--interpolation', 'bilinear'])
  overrides = {'image_size': options.image_size, 'crop_pct': options.crop_pct,
               'interpolation': options.interpolation}
  assert overrides == {'image_size': None, 'crop_pct': 1.0, 'interpolation': 'bilinear'}
  got, origin = eval_preprocessing.resolve({}, 'the flags', **overrides)
  assert got == EvalPreprocessing(crop_pct=1.0, interpolation='bilinear')
  assert origin.startswith('crop_pct, interpolation from the flags')


def test_describe():
  assert eval_preprocessing.OFFICIAL.describe() == (
      '224 px centre crop at crop_pct 0.875, bicubic, ImageNet mean/std')
  assert EvalPreprocessing(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)).describe().endswith(
      'mean [0.5, 0.5, 0.5], std [0.5, 0.5, 0.5]')


def test_the_input_pipeline_evaluates_as_the_description_says():
  data = input_pipeline.with_eval_preprocessing(common.get_config().data, DIGITS)
  assert eval_preprocessing.from_config(data) == DIGITS
  assert data.num_classes == 1000  # The rest of the config is kept.

"""Shared test helpers: the official reference fixtures (tests/fixtures, see its README), the
test lanes, libtpu for the TPU compiles, a tiny model trained on an image folder, and gs://
served by a GCS emulator on this machine. What the Pallas kernels' tests check alike is in
kernel_checks.py."""

import contextlib
import importlib.util
import json
import logging
import os
import pathlib
import socket
import subprocess
import sys
import uuid

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


# The slower lane (`pytest -m slow`; the README's test command runs `-m "not slow"`), by test:
# what takes more than ~8 s on 2 cores and repeats, for more shapes, forms, variants or
# commands, what a test of the fast lane shows for one case; and what needs several devices or
# processes. Tests that need libtpu (`needs_libtpu`) and whole training runs carry the marker
# themselves. `--durations` shows the slowest of each lane.
_SLOW = frozenset({
    'test_backbone.py::test_classification_weights_start_a_backbone_with_fresh_extra_norms',
    'test_backbone.py::test_drop_path_is_random_in_training_only_and_reproducible_per_rng',
    'test_backbone.py::test_norm_eval_freezes_batch_norm_statistics_in_a_training_step',
    'test_backbone.py::test_out_indices_select_maps_and_keep_every_official_key',
    'test_backbone.py::test_rmt_b_backbone_keys_are_the_classifiers_without_head_plus_extra_norms',
    'test_backbone_benchmark.py::test_program_embeds_no_decay_table_and_both_modes_run',
    'test_batch_augment.py::test_augment_runs_the_whole_recipe_under_jit',
    'test_batch_augment.py::test_each_op_equals_the_host_op',
    'test_batch_augment.py::test_randaugment_batch_applies_timms_order_with_one_warp',
    'test_batch_augment.py::test_randaugment_is_seeded_and_prob_zero_is_identity',
    'test_device_augment.py::test_each_device_augments_its_own_share_with_its_own_key',
    'test_bench.py::test_bench_command_prints_table_and_sane_json',
    'test_bench.py::test_bench_splits_the_batch_over_two_cpu_devices',
    'test_checkpoint.py::test_on_a_bucket_damaged_checkpoints_are_skipped_set_aside_and_saved_again',
    'test_console.py::test_importing_tensorflow_and_starting_jax_print_nothing',
    'test_convert.py::test_bad_input_fails_with_one_message_and_writes_nothing[random.bin-rmt_tiny-is not a PyTorch checkpoint]',
    'test_convert.py::test_bad_input_fails_with_one_message_and_writes_nothing[rmt_tiny.pth-rmt_t-says3]',
    'test_convert.py::test_command_line_round_trips_a_training_checkpoint_and_picks_the_entry',
    'test_convert.py::test_importing_and_running_the_model_does_not_import_torch',
    'test_convert.py::test_mapping_covers_the_official_manifest_both_ways[rmt_b]',
    'test_convert.py::test_mapping_covers_the_official_manifest_both_ways[rmt_l]',
    'test_convert.py::test_official_to_flax_to_official_is_bit_exact_and_reproduces_logits[b]',
    'test_convert.py::test_official_to_flax_to_official_is_bit_exact_and_reproduces_logits[tokenlabel]',
    'test_initializers.py::test_every_variable_of_the_networks_is_declared[rmt_s]',
    'test_input_pipeline.py::test_benchmark_command_runs',
    'test_input_pipeline.py::test_device_augmentation_gets_the_uint8_crops',
    'test_input_pipeline.py::test_same_seed_same_batches_and_exact_resume[folder]',
    'test_input_pipeline.py::test_same_seed_same_batches_and_exact_resume[tfds]',
    'test_input_pipeline.py::test_train_batches_with_the_official_recipe[tfds]',
    'test_kernels.py::test_every_form_gives_the_same_training_gradients',
    'test_kernels.py::test_tpu_forms_under_a_plain_jit_of_sharded_arrays_equal_one_device',
    'test_kernel_check.py::test_a_wrong_kernel_is_dropped_and_the_network_runs_the_plain_form',
    'test_kernel_check.py::test_the_command_prints_the_table',
    'test_kernel_check.py::test_a_training_run_on_tpus_checks_its_kernels_and_goes_on_without_a_failing_one',
    'test_loading.py::test_converter_and_predict_on_a_bucket',
    'test_main.py::test_data_errors_are_one_line_naming_the_path',
    'test_main.py::test_killed_run_resumes_to_the_uninterrupted_parameters',
    'test_main.py::test_missing_imagenet_prints_instructions_not_a_traceback',
    'test_main.py::test_sigterm_saves_then_exits_cleanly',
    'test_main.py::test_two_processes_train_agree_and_write_one_checkpoint',
    'test_matmul_bound.py::test_matmul_bound_command_prints_report_and_sane_json',
    'test_matmul_bound.py::test_products_are_the_forward_macs_and_three_times_them_in_training',
    'test_model.py::test_any_input_size_under_jit',
    'test_model.py::test_bfloat16_agrees_with_float32',
    'test_model.py::test_bfloat16_residual_stream_is_an_option_of_the_same_weights',
    'test_model.py::test_logits_and_features_match_official[a-auto]',
    'test_model.py::test_logits_and_features_match_official[a-cpu]',
    'test_model.py::test_logits_and_features_match_official[a-tpu]',
    'test_model.py::test_logits_and_features_match_official[b-auto]',
    'test_model.py::test_logits_and_features_match_official[b-tpu]',
    'test_model.py::test_logits_and_features_match_official[b-xla]',
    'test_model.py::test_logits_and_features_match_official[tokenlabel-auto]',
    'test_model.py::test_logits_and_features_match_official[tokenlabel-cpu]',
    'test_model.py::test_logits_and_features_match_official[tokenlabel-tpu]',
    'test_model.py::test_logits_and_features_match_official[tokenlabel-xla]',
    'test_model.py::test_macs_within_3_percent_of_fvcore[rmt_b]',
    'test_model.py::test_macs_within_3_percent_of_fvcore[rmt_l]',
    'test_model.py::test_macs_within_3_percent_of_fvcore[rmt_s]',
    'test_model.py::test_param_dtype_and_compute_dtype_are_separate',
    'test_model.py::test_parameter_count_equals_official[rmt_b]',
    'test_model.py::test_parameter_count_equals_official[rmt_l]',
    'test_model.py::test_remat_changes_memory_not_values',
    'test_model.py::test_train_mode_updates_batch_stats_and_drop_path_uses_dropout_rng',
    'test_nnx_bridge.py::test_eval_output_and_round_trip',
    'test_nnx_bridge.py::test_training_mode_and_gradients_match_linen',
    'test_nnx_bridge.py::test_variables_that_do_not_fit_are_refused',
    'test_official_training.py::test_one_device_matches_the_official_loop',
    'test_official_training.py::test_sharded_steps_match_the_official_loop',
    'test_optim.py::test_weight_decay_mask_counts_on_rmt_b',
    'test_package.py::test_model_builds_runs_and_differentiates_without_the_training_stack',
    'test_predict.py::test_a_trained_digits_model_is_right_with_the_default_flags',
    'test_predict.py::test_imagenet_model_prints_readable_names_without_model_flag',
    'test_predict.py::test_probabilities_are_the_models_softmax_in_padded_batches',
    'test_predict.py::test_weights_without_stored_preprocessing_get_the_official_one',
    'test_segmentation.py::test_a_segmenter_fits_fixed_mosaics_its_loss_falls',
    'test_sharding.py::test_sharded_train_step_matches_one_device',
    'test_tpu_block_head.py::test_a_block_takes_one_cotangent_per_output_where_every_use_does_not_fit',
    'test_tpu_block_head.py::test_a_block_under_tpu_kernels_equals_the_plain_forms',
    'test_tpu_block_head.py::test_bfloat16_within_its_rounding_of_the_plain_form',
    'test_tpu_block_head.py::test_kernels_compile_for_a_v5p_and_a_v4',
    'test_tpu_block_head.py::test_split_over_a_mesh_equals_one_device',
    'test_tpu_block_head.py::test_values_and_gradients_equal_the_plain_form[2-8-8-16-plan3]',
    'test_tpu_block_head.py::test_values_and_gradients_equal_the_plain_form[3-8-8-8-plan4]',
    'test_tpu_block_head.py::test_values_and_gradients_equal_the_plain_form[4-8-8-16-plan2]',
    'test_tpu_block_head.py::test_values_and_gradients_equal_the_plain_form[8-4-6-8-plan1]',
    'test_tpu_block_tail.py::test_a_block_under_tpu_kernels_equals_the_plain_forms[False-0.0]',
    'test_tpu_block_tail.py::test_a_block_under_tpu_kernels_equals_the_plain_forms[True-0.0]',
    'test_tpu_block_tail.py::test_a_block_under_tpu_kernels_equals_the_plain_forms[True-0.5]',
    'test_tpu_block_tail.py::test_bfloat16_within_its_rounding_of_the_plain_form',
    'test_tpu_block_tail.py::test_drop_path_and_layerscale_equal_the_plain_form[4-5-6-8-24-plan1]',
    'test_tpu_block_tail.py::test_drop_path_and_layerscale_equal_the_plain_form[4-8-8-8-16-plan2]',
    'test_tpu_block_tail.py::test_drop_path_and_layerscale_equal_the_plain_form[8-4-6-8-16-plan0]',
    'test_tpu_block_tail.py::test_kernels_compile_for_a_v5p_and_a_v4',
    'test_tpu_block_tail.py::test_split_over_a_mesh_equals_one_device',
    'test_tpu_block_tail.py::test_values_and_gradients_equal_the_plain_form[2-8-8-16-48-plan3]',
    'test_tpu_block_tail.py::test_values_and_gradients_equal_the_plain_form[3-4-4-8-16-plan2]',
    'test_tpu_block_tail.py::test_values_and_gradients_equal_the_plain_form[3-8-8-8-16-plan4]',
    'test_tpu_block_tail.py::test_values_and_gradients_equal_the_plain_form[8-8-8-16-200-plan1]',
    'test_tpu_compile.py::test_every_kernel_of_a_block_stays_in_the_compiled_program',
    'test_tpu_compile.py::test_one_block_compiles_for_one_device_and_reports_its_cost',
    'test_tpu_compile.py::test_tiny_config_compiles_for_a_v5p_slice_and_reports_its_cost',
    'test_tpu_compile.py::test_without_libtpu_the_command_says_how_to_install_it',
    'test_tpu_feed_forward.py::test_bfloat16_within_its_rounding_of_the_plain_form',
    'test_tpu_feed_forward.py::test_kernels_compile_for_a_v5p_and_a_v4',
    'test_tpu_feed_forward.py::test_split_over_a_mesh_equals_one_device',
    'test_tpu_feed_forward.py::test_values_and_gradients_equal_the_plain_form[8-8-8-16-200-plan1]',
    'test_tpu_forms.py::test_column_layout_equals_the_transposed_plain_form[2-3-4-10-16-float32]',
    'test_tpu_forms.py::test_column_layout_equals_the_transposed_plain_form[2-5-16-4-8-bfloat16]',
    'test_tpu_forms.py::test_column_layout_equals_the_transposed_plain_form[3-5-16-4-8-float32]',
    'test_tpu_forms.py::test_column_layout_split_over_a_mesh_equals_one_device',
    'test_tpu_forms.py::test_kernels_compile_for_a_v5p',
    'test_tpu_forms.py::test_masa_takes_the_transposes_where_the_column_layout_does_not_fit',
    'test_tpu_forms.py::test_masa_under_tpu_kernels_equals_the_plain_form[True]',
    'test_tpu_forms.py::test_values_and_gradients_equal_the_plain_form[3-25-4-16-5]',
    'test_tpu_lepe.py::test_a_masa_under_tpu_kernels_equals_the_plain_forms',
    'test_tpu_lepe.py::test_bfloat16_within_its_rounding_of_the_plain_form',
    'test_tpu_lepe.py::test_kernels_compile_for_a_v5p_and_a_v4',
    'test_tpu_lepe.py::test_split_over_a_mesh_equals_one_device',
    'test_tpu_lepe.py::test_values_and_gradients_equal_the_plain_form[4-8-8-16-plan2]',
    'test_tpu_projections.py::test_bfloat16_within_its_rounding_of_the_plain_form',
    'test_tpu_projections.py::test_block_under_tpu_kernels_equals_the_plain_form',
    'test_tpu_projections.py::test_kernels_compile_for_a_v5p_and_a_v4',
    'test_tpu_projections.py::test_split_over_a_mesh_equals_one_device',
    'test_tpu_projections.py::test_values_and_gradients_equal_the_plain_form[4-4-7-16-16-28-4-2]',
    'test_visualize.py::test_bad_input_is_one_clear_message',
    'test_visualize.py::test_capture_changes_no_logits',
    'test_visualize.py::test_capture_off_compiles_the_same_program',
    'test_visualize.py::test_captured_weights_are_distributions',
    'test_visualize.py::test_command_draws_the_image_and_each_heads_prior_and_attention',
})


def pytest_collection_modifyitems(config, items):  # pylint: disable=unused-argument
  for item in items:
    # A test by its id (one parametrisation) or by its name (all of them).
    if {f'{item.path.name}::{item.name}', f'{item.path.name}::{item.originalname}'} & _SLOW:
      item.add_marker(pytest.mark.slow)


# libtpu, for the tests that compile for a TPU on this CPU host. No runtime requirement installs
# it: the README's slow-lane command installs it into `.venv/libtpu` (requirements-tpu.txt), a folder
# that ordinary runs never put on their path; `RMT_LIBTPU_DIR` points elsewhere, and a libtpu
# importable from the environment is used too.
REPO = pathlib.Path(__file__).resolve().parents[1]
LIBTPU_DIR = pathlib.Path(os.environ.get('RMT_LIBTPU_DIR', REPO / '.venv' / 'libtpu'))


def libtpu_env(with_libtpu: bool) -> dict[str, str]:
  """The environment of a subprocess that imports rmt_jax, with libtpu on its path or not."""
  env = dict(os.environ)
  paths = [str(REPO)] + ([str(LIBTPU_DIR)] if with_libtpu else [])
  env['PYTHONPATH'] = os.pathsep.join(paths + [env.get('PYTHONPATH', '')]).rstrip(os.pathsep)
  return env


def has_libtpu() -> bool:
  return (LIBTPU_DIR / 'libtpu').is_dir() or importlib.util.find_spec('libtpu') is not None


def needs_libtpu(test):
  """Marks a test that compiles for a TPU with libtpu: it runs in the slow lane, and is skipped
  with the reason where libtpu is not installed."""
  return pytest.mark.slow(pytest.mark.skipif(
      not has_libtpu(), reason=f'libtpu not installed (pip install --target {LIBTPU_DIR} '
      "'libtpu==0.0.42.*', as the README's slow-lane command does)")(test))


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


# ---------------------------------------------------------------------------------------
# A tiny model trained by main.py on an image folder: what predict and rmt_jax.load read.

FOLDER_CLASSES = ('cat', 'dog', 'fish')


def main_env(cache_dir) -> dict:
  """The environment of main.py subprocesses: one persistent compilation cache per session
  and ~3x faster XLA:CPU compiles (every run of a comparison is compiled alike)."""
  return dict(
      os.environ, PYTHONPATH=str(REPO), JAX_COMPILATION_CACHE_DIR=str(cache_dir),
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0',
      XLA_FLAGS='--xla_backend_optimization_level=0')


def write_image_folder(root: pathlib.Path, per_class: dict[str, int]) -> None:
  """root/<split>/<class>/<n>.png: 16x16 images tinted by class (red, green, blue)."""
  tf = pytest.importorskip('tensorflow', reason='the image folder is written with TensorFlow')
  rng = np.random.default_rng(0)
  for split, count in per_class.items():
    for label, name in enumerate(FOLDER_CLASSES):
      folder = root / split / name
      folder.mkdir(parents=True, exist_ok=True)
      for i in range(count):
        pixels = rng.integers(0, 96, (16, 16, 3), dtype=np.uint8)
        pixels[..., label] += 150
        (folder / f'{i}.png').write_bytes(tf.io.encode_png(pixels).numpy())


@pytest.fixture(scope='session')
def folder_workdir(tmp_path_factory) -> pathlib.Path:
  """The workdir of `main.py --config configs/tiny_test.py` trained 2 steps on an image folder
  of the classes cat, dog, fish (a 3-class head; the names are stored with the checkpoint)."""
  root = tmp_path_factory.mktemp('folder_run')
  write_image_folder(root / 'data', {'train': 8, 'val': 2})
  workdir = root / 'workdir'
  result = subprocess.run(
      [sys.executable, str(REPO / 'main.py'), '--config', str(REPO / 'configs/tiny_test.py'),
       '--workdir', str(workdir), '--config.data.dataset=folder',
       f'--config.data.folder_root={root / "data"}', '--config.num_classes=3',
       '--config.total_steps=2'],
      cwd=REPO, env=main_env(root / 'jax_cache'), capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


# ---------------------------------------------------------------------------------------
# gs:// on this machine: a GCS emulator (the gcp-storage-emulator package, in memory) on a free
# loopback port, reached by each client that a run on a gs:// workdir uses, through that
# client's own setting for another endpoint: TensorStore's GCS driver (orbax's arrays) by
# TENSORSTORE_GCS_HTTP_URL, google-cloud-storage (orbax's bucket queries) by
# STORAGE_EMULATOR_HOST, and epath (orbax's directories and small files, rmt_jax's renames)
# through fsspec's gcsfs, which reads STORAGE_EMULATOR_HOST too. With TensorFlow installed epath
# would take TensorFlow's GCS client instead, which has no endpoint setting; so epath is told to
# use fsspec, as it does where TensorFlow is absent.

GCS_BUCKET = 'rmt-jax-test'


def _fill_emulator_gaps(patch: pytest.MonkeyPatch, emulator) -> None:
  """Gives the emulator two answers of GCS's that it lacks and that the clients rely on.

  - A download's generation (the `x-goog-generation` header): TensorStore keeps it to ask
    "changed since?" on its next read (OCDBT's manifest, during a save), and refuses the 0 it
    takes for a missing header ("Malformed StorageGeneration").
  - objects.move (`.../moveTo/...`): gcsfs renames with it (a damaged checkpoint set aside),
    and retries the emulator's 'not implemented' for a minute per object before it copies.
  """
  from gcp_storage_emulator.handlers import objects  # pylint: disable=g-import-not-at-top
  download = objects.download

  def download_with_generation(request, response, storage, *args, **kwargs):
    download(request, response, storage, *args, **kwargs)
    if response.status in (200, 206):
      stored = storage.get_file_obj(request.params['bucket_name'], request.params['object_id'])
      response['x-goog-generation'] = stored['generation']
      response['x-goog-metageneration'] = stored['metageneration']

  def move(request, response, storage, *args, **kwargs):  # pylint: disable=unused-argument
    request.params['dest_bucket_name'] = request.params['bucket_name']
    objects.copy(request, response, storage)
    if response.status == 200:
      storage.delete_file(request.params['bucket_name'], request.params['object_id'])

  patch.setattr(objects, 'download', download_with_generation)  # Called by objects.get too.
  routes = tuple((pattern, {method: download_with_generation if handler is download else handler
                            for method, handler in handlers.items()})
                 for pattern, handlers in emulator.HANDLERS)
  patch.setattr(emulator, 'HANDLERS', ((
      r'^/storage/v1/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)/moveTo/o/'
      r'(?P<dest_object_id>.*[^/]+)$', {'POST': move}),) + routes)


@pytest.fixture(scope='session')
def gcs_emulator():
  """gs://rmt-jax-test served from memory on this machine for the session (see above).

  Every request stays on the loopback address: each client is pointed at the emulator, with a
  fixed token for TensorStore and anonymous access for the others, so that none looks for
  credentials on a metadata server; the metadata server's address is the emulator's too.
  Skipped with the reason where the emulator or gcsfs is not installed.

  Yields:
    The bucket's URL, 'gs://rmt-jax-test'.
  """
  emulator = pytest.importorskip(
      'gcp_storage_emulator.server', reason='gs:// tests need gcp-storage-emulator '
      '(requirements-test.txt)')
  gcsfs = pytest.importorskip('gcsfs', reason='gs:// tests need gcsfs (requirements-test.txt)')
  import fsspec  # pylint: disable=g-import-not-at-top
  from etils.epath import gpath  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  url = f'http://127.0.0.1:{port}'
  with pytest.MonkeyPatch.context() as patch:
    _fill_emulator_gaps(patch, emulator)
    # Its log reports each object a reader looks for and finds absent, as an error.
    patch.setattr(logging.getLogger('gcp_storage_emulator'), 'level', logging.CRITICAL)
    server = emulator.create_server('127.0.0.1', port, in_memory=True, default_bucket=GCS_BUCKET)
    server._api.daemon = True  # pylint: disable=protected-access
    server.start()
    # A client that hangs up before the answer (TensorStore does, on reads it abandons) is
    # no error of the server's; its traceback is left out.
    server._api._httpd.handle_error = lambda *_: None  # pylint: disable=protected-access
    for name in ('TENSORSTORE_GCS_HTTP_URL', 'STORAGE_EMULATOR_HOST'):
      patch.setenv(name, url)
    patch.setenv('GOOGLE_AUTH_TOKEN_FOR_TESTING', 'emulator')
    for name in ('GCE_METADATA_ROOT', 'GCE_METADATA_HOST', 'GCE_METADATA_IP'):
      patch.setenv(name, f'127.0.0.1:{port}')
    patch.setenv('EPATH_USE_TF', 'false')
    patch.setattr(gpath, '_is_tf_installed', lambda: False)  # It caches the variable's value.
    # Listings uncached, as TensorFlow's GCS client reads them: TensorStore writes past gcsfs.
    patch.setitem(fsspec.config.conf, 'gcs', {'token': 'anon', 'use_listings_cache': False})
    # gcsfs's default class asks GCS's control API (gRPC, which the emulator lacks) for each
    # bucket's layout, a minute per attempt; the plain class speaks the JSON API alone.
    previous = {protocol: fsspec.get_filesystem_class(protocol) for protocol in ('gs', 'gcs')}
    for protocol in previous:
      fsspec.register_implementation(protocol, gcsfs.core.GCSFileSystem, clobber=True)
    try:
      yield f'gs://{GCS_BUCKET}'
    finally:
      for protocol, cls in previous.items():
        fsspec.register_implementation(protocol, cls, clobber=True)
      gcsfs.core.GCSFileSystem.clear_instance_cache()
      server.stop()


@pytest.fixture
def gcs_workdir(gcs_emulator):
  """A gs:// directory of the test's own (nothing there yet), on `gcs_emulator`."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  return epath.Path(f'{gcs_emulator}/{uuid.uuid4().hex[:8]}')


@contextlib.contextmanager
def programs_built_once_without_evaluation():
  """Within the block, `loop.train_and_evaluate` builds its programs once and every later run
  reuses them (one compile for a run and its resumptions), and no run evaluates (zeros stand
  for the metrics): for tests of training and resumption alone."""
  # pylint: disable=g-import-not-at-top
  from rmt_jax.data import input_pipeline
  from rmt_jax.train import steps
  from rmt_jax.train import tasks
  build_programs, programs = steps.build_programs, {}

  def build_once(*args, **kwargs):
    if not programs:
      programs['built'] = build_programs(*args, **kwargs)
    return programs['built']

  unevaluated = {n: {'loss': 0.0, 'top1': 0.0, 'top5': 0.0} for n in ('eval', 'eval_ema')}
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(steps, 'build_programs', build_once)
    patch.setattr(tasks.Classification, 'evaluate', lambda *_: unevaluated)
    patch.setattr(input_pipeline, 'create_eval_iterator', lambda *_, **__: [])
    yield

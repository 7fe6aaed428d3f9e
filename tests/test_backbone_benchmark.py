"""benchmarks.backbone: the constants it reports are the program's, and both modes run."""

from rmt_jax.models import decay


def test_reports_the_embedded_decay_table_and_runs_both_modes():
  from benchmarks import backbone  # pylint: disable=g-import-not-at-top
  # rmt_tiny at 128 x 192: stage 4 attends over 4 x 6 positions with 4 heads.
  lowered = backbone.run('rmt_tiny', (128, 192), 'forward', lower_only=True)
  assert 'compile_s' not in lowered
  table = decay.manhattan_decay(4, 6, 4, 2, 6)
  assert (table.nbytes, '4x24x24xf32') in lowered['constants']
  for mode in ('forward', 'grad'):
    result = backbone.run('rmt_tiny', (64, 96), mode, repeats=1)
    assert len(result['seconds']) == 1 and result['peak_rss_bytes'] > 0
    text = backbone.format_result(result)
    assert f'rmt_tiny backbone, 64x96, batch 1, float32, {mode}' in text
    assert 's per call' in text and 'GiB resident' in text

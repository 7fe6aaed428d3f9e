"""benchmarks.backbone: the program embeds no table that grows with the input, and both modes
run."""


def test_program_embeds_no_decay_table_and_both_modes_run():
  from benchmarks import backbone  # pylint: disable=g-import-not-at-top
  # rmt_tiny at 128 x 192: stage 4 attends over 4 x 6 positions with 4 heads.
  lowered = backbone.run('rmt_tiny', (128, 192), 'forward', lower_only=True)
  assert 'compile_s' not in lowered
  # The decays are computed in the program from iotas: the whole-attention decay of stage 4,
  # 4 x 24 x 24 float32, was once embedded. What is left are the rotary tables, linear in the
  # map's size (32 x 48 x 8 float32 for stage 1).
  shapes = [shape for _, shape in lowered['constants']]
  assert not any('24x24' in shape for shape in shapes), shapes
  assert max(size for size, _ in lowered['constants']) == 32 * 48 * 8 * 4
  for mode in ('forward', 'grad'):
    result = backbone.run('rmt_tiny', (64, 96), mode, repeats=1)
    assert len(result['seconds']) == 1 and result['peak_rss_bytes'] > 0
    text = backbone.format_result(result)
    assert f'rmt_tiny backbone, 64x96, batch 1, float32, {mode}' in text
    assert 's per call' in text and 'GiB resident' in text

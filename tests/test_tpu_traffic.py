"""`rmt_jax.analysis.tpu_traffic`: the per-layer accounting of a compiled TPU program's memory traffic.

The HLO below is written in the form libtpu prints (`compiled.as_text()`), with the layouts,
tiles and memory spaces it assigns; a real program compiled for TPU is read in
test_tpu_compile.py when libtpu is installed.
"""

import pytest

from rmt_jax.analysis import tpu_traffic

_BLOCK = 'jit(train)/{}jvp(RMT){}/RMT.features/layers_{}/blocks_{}/{}'
_HLO = f"""HloModule jit_train, entry_computation_layout={{...}}

%fused_computation.1 (param_0: bf16[64,14,14,64]) -> bf16[64,14,14,64] {{
  %param_0 = bf16[64,14,14,64]{{3,0,2,1:T(8,128)(2,1)}} parameter(0)
  ROOT %negate.1 = bf16[64,14,14,64]{{3,0,2,1:T(8,128)(2,1)}} negate(%param_0)
}}

ENTRY %main.1 (x.1: bf16[64,14,14,64], w.1: f32[64,64]) -> (bf16[64,14,14,64], f32[64,64]) {{
  %x.1 = bf16[64,14,14,64]{{3,0,2,1:T(8,128)(2,1)}} parameter(0), metadata={{op_name="x"}}
  %w.1 = f32[64,64]{{1,0:T(8,128)}} parameter(1), metadata={{op_name="w"}}
  %fusion.1 = bf16[64,14,14,64]{{3,0,2,1:T(8,128)(2,1)}} fusion(%x.1), kind=kLoop, calls=%fused_computation.1, metadata={{op_name="{_BLOCK.format('', '', 2, 5, 'retention/lepe/conv_general_dilated')}"}}
  %copy-start.1 = (bf16[64,14,14,64]{{3,0,2,1:T(8,128)(2,1)S(1)}}, bf16[64,14,14,64]{{3,0,2,1:T(8,128)(2,1)}}, u32[]{{:S(2)}}) copy-start(%fusion.1)
  %copy-done.1 = bf16[64,14,14,64]{{3,0,2,1:T(8,128)(2,1)S(1)}} copy-done(%copy-start.1)
  %custom-call.1 = bf16[64,14,14,64]{{3,2,1,0:T(8,128)(2,1)}} custom-call(%copy-done.1), custom_call_target="tpu_custom_call", metadata={{op_name="{_BLOCK.format('transpose(', ')', 0, 1, 'retention/shard_map/pallas_call')}"}}, backend_config={{"custom_call_config":{{"cost_estimate":{{"flops":"100","transcendentals":"7","bytes_accessed":"2000"}}}}}}
  %multiply.1 = f32[64,64]{{1,0:T(8,128)}} multiply(%w.1, %w.1), metadata={{op_name="jit(train)/mul"}}
  ROOT %tuple.1 = (bf16[64,14,14,64]{{3,2,1,0:T(8,128)(2,1)}}, f32[64,64]{{1,0:T(8,128)}}) tuple(%custom-call.1, %multiply.1)
}}
"""

# 64 channels on the lane axis occupy 128 lanes; the batch axis (second-minor here) is whole.
_PADDED = 64 * 14 * 14 * 128 * 2
_PADDED_ROW_MAJOR = 64 * 14 * 16 * 128 * 2  # rows of 14 on the sublane axis pad to 16
_W = 64 * 128 * 4


def test_operations_count_operands_and_results_at_tiled_size_by_layer():
  ops = {op.name: op for op in tpu_traffic.operations(_HLO)}
  assert set(ops) == {'fusion.1', 'copy-start.1', 'custom-call.1', 'multiply.1'}

  lepe = ops['fusion.1']
  assert (lepe.layer, lepe.stage, lepe.backward) == ('retention/lepe', 3, False)
  assert lepe.bytes == 2 * _PADDED and lepe.vmem_bytes == 0

  # Reads the fusion's result, writes a VMEM and an HBM buffer; for the kernel that reads the
  # copy (the backward attention of stage 1).
  prefetch = ops['copy-start.1']
  assert (prefetch.layer, prefetch.stage, prefetch.backward) == ('retention (prefetch)', 1, True)
  assert prefetch.bytes == 3 * _PADDED + 4 and prefetch.vmem_bytes == _PADDED

  kernel = ops['custom-call.1']
  assert (kernel.layer, kernel.stage, kernel.backward) == ('retention (Pallas kernel)', 1, True)
  assert kernel.bytes == _PADDED + _PADDED_ROW_MAJOR and kernel.vmem_bytes == _PADDED
  assert kernel.declared == {'flops': 100, 'transcendentals': 7, 'bytes_accessed': 2000}

  optimizer = ops['multiply.1']
  assert (optimizer.layer, optimizer.stage) == (tpu_traffic._OUTSIDE, 0)
  assert optimizer.bytes == 3 * _W


def test_summary_groups_by_layer_and_stage_and_formats_both():
  summary = tpu_traffic.summarize(tpu_traffic.operations(_HLO))
  total = 2 * _PADDED + (3 * _PADDED + 4) + (_PADDED + _PADDED_ROW_MAJOR) + 3 * _W
  assert summary['bytes'] == total
  assert summary['vmem_bytes'] == 2 * _PADDED
  layers = {row['layer']: (row['forward_bytes'], row['backward_bytes'])
            for row in summary['by_layer']}
  assert layers['retention/lepe'] == (2 * _PADDED, 0)
  assert layers['retention (Pallas kernel)'] == (0, _PADDED + _PADDED_ROW_MAJOR)
  assert layers['retention (prefetch)'] == (0, 3 * _PADDED + 4)
  assert [row['layer'] for row in summary['by_layer']][0] == 'retention (prefetch)'
  stages = {row['stage']: row['forward_bytes'] + row['backward_bytes']
            for row in summary['by_stage']}
  assert stages == {0: 3 * _W, 1: _PADDED + _PADDED_ROW_MAJOR + 3 * _PADDED + 4,
                    3: 2 * _PADDED}

  text = tpu_traffic.format_summary(summary, xla_bytes=2e9, rows=2)
  assert "XLA's cost model counts 2.00 GB" in text
  assert '| 2 more | | |' in text
  assert '| stage 3 |' in text and '| outside stages |' in text


def test_a_prefetch_that_nothing_reads_keeps_a_line_of_its_own():
  # The kernel reads the fusion's result from HBM; the copy in VMEM goes unread.
  ops = {op.name: op for op in tpu_traffic.operations(
      _HLO.replace('custom-call(%copy-done.1)', 'custom-call(%fusion.1)'))}
  assert ops['copy-start.1'].layer == 'XLA copies between HBM and VMEM (copy-start)'
  assert ops['copy-start.1'].stage == 3  # the array copied, the lepe conv's


def test_loops_and_texts_without_an_entry_are_refused():
  with pytest.raises(ValueError, match='no ENTRY'):
    tpu_traffic.operations('HloModule m')
  looped = _HLO.replace('%multiply.1 = f32[64,64]{1,0:T(8,128)} multiply(%w.1, %w.1)',
                        '%multiply.1 = f32[64,64]{1,0:T(8,128)} while(%w.1)')
  with pytest.raises(ValueError, match='while loop'):
    tpu_traffic.operations(looped)


def test_a_block_compiled_alone_is_read_by_its_parts():
  # `tpu_compile --block`: no model scope above the block, no stage.
  assert tpu_traffic._layer('jit(step)/transpose(jvp(RetBlock))/retention/lepe/conv') == (
      'retention/lepe', 0)
  assert tpu_traffic._layer('jit(step)/jvp(RetBlock)/pos/add') == ('pos', 0)
  assert tpu_traffic._layer('jit(step)/jvp(RetBlock)/add') == ('block (other)', 0)
  assert tpu_traffic._layer('jit(step)/mul') == (tpu_traffic._OUTSIDE, 0)

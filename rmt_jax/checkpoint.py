"""Checkpoints on disk: directories of model variables (orbax) with a JSON description.

A variables directory, as written by `python -m rmt_jax.convert torch2flax` or
`save_variables`, holds:

    DIR/rmt_jax.json   {"format": "rmt_jax.variables", "version": 1, "model": "rmt_s",
                        "model_overrides": {...}, ...anything the writer adds}
    DIR/variables/     an orbax StandardCheckpointer tree: {'params', 'batch_stats',
                        and optionally 'official_buffers'} (see rmt_jax.convert)

`load_variables` reads it back as host (NumPy) arrays.
"""

import json
import os
import pathlib
import shutil
import tempfile
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

FORMAT = 'rmt_jax.variables'
METADATA_FILE = 'rmt_jax.json'
VARIABLES_DIR = 'variables'


class CheckpointNotFoundError(FileNotFoundError):
  """The path holds no rmt_jax checkpoint; the message says what was expected there."""


def save_variables(path: str | os.PathLike, variables: Mapping[str, Any],
                   metadata: Mapping[str, Any]) -> None:
  """Writes `variables` and their description to a new directory, atomically.

  The directory is assembled beside `path` and renamed into place only when complete, so an
  interrupted or failed save leaves nothing at `path`.

  Args:
    path: the directory to create; must not exist.
    variables: {'params', 'batch_stats', ...} of arrays.
    metadata: JSON-serialisable description; must name the variant under 'model' (and any
      `create_model` overrides under 'model_overrides') so that readers can rebuild the model.

  Raises:
    FileExistsError: `path` exists.
    ValueError: metadata without 'model'.
  """
  path = pathlib.Path(path).absolute()
  if path.exists():
    raise FileExistsError(f'{path} exists; choose a new directory or remove it first')
  if 'model' not in metadata:
    raise ValueError("metadata must name the variant under 'model'")
  path.parent.mkdir(parents=True, exist_ok=True)
  staging = pathlib.Path(tempfile.mkdtemp(prefix=f'.{path.name}.partial-', dir=path.parent))
  try:
    host = jax.tree.map(np.asarray, dict(variables))
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(staging / VARIABLES_DIR, host)
    checkpointer.wait_until_finished()
    (staging / METADATA_FILE).write_text(
        json.dumps({'format': FORMAT, 'version': 1, **metadata}, indent=2, sort_keys=True))
    staging.rename(path)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
  """The JSON description of a variables directory.

  Raises:
    CheckpointNotFoundError: `path` is not a variables directory.
  """
  path = pathlib.Path(path)
  meta_file = path / METADATA_FILE
  if not meta_file.is_file() or not (path / VARIABLES_DIR).is_dir():
    raise CheckpointNotFoundError(
        f'{path} is not an rmt_jax variables directory (expected {METADATA_FILE} and '
        f'{VARIABLES_DIR}/ in it, as written by `python -m rmt_jax.convert torch2flax`)')
  metadata = json.loads(meta_file.read_text())
  if metadata.get('format') != FORMAT:
    raise CheckpointNotFoundError(f'{meta_file} is not an rmt_jax variables description')
  return metadata


def load_variables(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
  """Reads a variables directory.

  Args:
    path: a directory written by `save_variables` (e.g. by the converter).

  Returns:
    (variables as NumPy arrays, metadata). Rebuild the model with
    `rmt_jax.create_model(metadata['model'], **metadata.get('model_overrides', {}))`.

  Raises:
    CheckpointNotFoundError: `path` holds no checkpoint that rmt_jax can read.
  """
  path = pathlib.Path(path).absolute()
  metadata = read_metadata(path)
  restored = ocp.StandardCheckpointer().restore(path / VARIABLES_DIR)
  return jax.tree.map(np.asarray, restored), metadata

"""Readable class names: ImageNet-1k's, shipped with the package, in label order.

`imagenet2012_classes.tsv` (beside this file) holds one line per class, in the label order of
TFDS `imagenet2012` and of torchvision's ImageFolder on the release (sorted WordNet ids):
`<synset id>\t<WordNet lemmas>`, e.g. `n01440764\ttench, Tinca tinca`. It was written from the
tensorflow_datasets 4.9.10 package: the ids from `datasets/imagenet2012/labels.txt`, the
lemmas from `IMAGENET_LABELS_LIST` in `datasets/siscore/labels.py` (the standard list, with the
two cranes told apart as "crane (bird)" and "crane (machine)"). Reading it needs neither
TensorFlow nor a download.
"""

import functools
import importlib.resources

IMAGENET_CLASSES_FILE = 'imagenet2012_classes.tsv'
IMAGENET_NUM_CLASSES = 1000


@functools.cache
def imagenet_classes() -> tuple[tuple[str, str], ...]:
  """(synset id, WordNet lemmas) of the 1000 ImageNet-1k classes, in label order."""
  text = (importlib.resources.files('rmt_jax') / IMAGENET_CLASSES_FILE).read_text('utf-8')
  rows = tuple(tuple(line.split('\t')) for line in text.splitlines() if line)
  assert len(rows) == IMAGENET_NUM_CLASSES, f'{IMAGENET_CLASSES_FILE}: {len(rows)} rows'
  return rows


def imagenet_class_names() -> list[str]:
  """The readable names of the 1000 ImageNet-1k classes in label order: each class's first
  lemma ('tench', 'goldfish', ..., 'toilet tissue'); class 0 is 'tench'."""
  return [lemmas.split(', ')[0] for _, lemmas in imagenet_classes()]


def imagenet_synsets() -> list[str]:
  """The WordNet ids of the 1000 ImageNet-1k classes in label order ('n01440764', ...)."""
  return [synset for synset, _ in imagenet_classes()]


def default_class_names(num_classes: int) -> list[str]:
  """Names for a classifier whose weights store none: ImageNet's for 1000 classes, else the
  label indices as strings."""
  if num_classes == IMAGENET_NUM_CLASSES:
    return imagenet_class_names()
  return [str(i) for i in range(num_classes)]

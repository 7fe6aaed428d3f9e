"""The one command-line style of every rmt_jax command: absl flags, parsed by `parse`.

`main.py` and `rmt_jax.tpu_compile` take an ml_collections config (`--config`, with overrides
such as `--config.kernels=xla`), which only absl's flags parse; every other command speaks the
same dialect: `--name=value` or `--name value`, underscores in names, `--flag` / `--noflag` for
booleans, comma-separated lists, `--help`.

A command defines its flags on a `flags.FlagValues` of its own, made afresh for each call of its
`main(argv)`, rather than on absl's global `flags.FLAGS`: commands can then be imported together
(tests, a notebook) without their flags colliding, and `main` can be called more than once in a
process with nothing left over from the previous call. Usage errors are one `error:` line on
stderr and exit status 2; `--help` prints the command's docstring and flags and exits 0.
"""

import sys
from typing import Sequence

from absl import flags


def parse(flag_values: flags.FlagValues, argv: Sequence[str] | None, *, program: str,
          doc: str, positional: Sequence[str] = ()) -> list[str]:
  """Parses a command's arguments into `flag_values`; returns the positional arguments.

  Args:
    flag_values: the command's flags, defined on this object (see the module docstring).
    argv: the arguments after the program name; None takes `sys.argv[1:]`.
    program: how a user runs the command, e.g. 'python -m rmt_jax.convert', for messages.
    doc: the command's description (its module docstring), printed by `--help`.
    positional: the names of the positional arguments the command takes, in order; more or
      fewer than these is a usage error. A last name in brackets, '[image]', may be left out;
      a last '...', as in ('image', '...'), lets the name before it repeat (one or more).

  Raises:
    SystemExit: 0 after `--help`; 2 after a usage error, reported in one line on stderr.
  """
  args = list(sys.argv[1:] if argv is None else argv)
  names = list(positional)
  repeats = names[-1:] == ['...']
  if repeats:
    names.pop()
  optional = bool(names) and names[-1].startswith('[')
  shown = ' '.join(f'[<{name[1:-1]}>]' if name.startswith('[') else f'<{name}>'
                   for name in names) + (' ...' if repeats else '')
  if any(a in ('-h', '--help', '-help', '--helpfull') for a in args):
    usage = ' '.join(filter(None, [program, shown, '[flags]']))
    print(f'usage: {usage}\n\n{doc.strip()}\n\nflags:\n{flag_values.get_help()}')
    raise SystemExit(0)
  try:
    rest = flag_values([program, *args])[1:]
  except flags.Error as e:
    usage_error(program, str(e))
  fewest = len(names) - optional
  most = float('inf') if repeats else len(names)
  if not fewest <= len(rest) <= most:
    got = ' '.join(rest) or 'none'
    usage_error(program, f'expected {shown or "no positional arguments"}; got {got}')
  return rest


def usage_error(program: str, message: str) -> None:
  """Reports a usage error in one line on stderr and exits with status 2."""
  print(f'error: {message} (see {program} --help)', file=sys.stderr)
  raise SystemExit(2)

"""Reading jsonl files row by row, with errors that name the file and the 1-based line.

Every jsonl reader in `jaxstar.data` goes through `read_jsonl`: a row that is not valid JSON,
lacks a field, or has a field of the wrong type either raises `ValueError("<path>:<line>: ...")`
or, with `skip_malformed=True`, is dropped and counted in `Loaded.num_skipped`.
"""
import dataclasses
import glob
import json
import logging
import os
from typing import Any, Callable, Generic, Iterator, Sequence, TypeVar

T = TypeVar('T')
_MAX_WARNINGS = 10  # Skipped rows logged individually; the rest only counted.


class MalformedRow(ValueError):
  """Raised by a row parser for a row it cannot use; `read_jsonl` adds file and line."""


@dataclasses.dataclass(frozen=True)
class Loaded(Generic[T]):
  """Rows read from one or more files, and how many malformed rows were skipped."""

  rows: list[T]
  num_skipped: int = 0

  def __len__(self) -> int:
    return len(self.rows)

  def __iter__(self) -> Iterator[T]:
    return iter(self.rows)

  def __getitem__(self, i):
    return self.rows[i]


def expand_paths(paths: str | Sequence[str]) -> list[str]:
  """Expands a path, a comma-separated string of paths, or a list of paths/globs, in order.

  Raises FileNotFoundError naming any entry that matches no file.
  """
  if isinstance(paths, str):
    paths = [p for p in paths.split(',')]
  out = []
  for p in paths:
    p = os.path.expanduser(p.strip())
    if not p:
      continue
    matches = sorted(glob.glob(p)) if glob.has_magic(p) else ([p] if os.path.isfile(p) else [])
    if not matches:
      raise FileNotFoundError(f'no file matches {p!r}')
    out.extend(matches)
  if not out:
    raise ValueError('no input paths given')
  return out


def get_field(row: Any, key: str, kind: type | tuple[type, ...]) -> Any:
  """Returns `row[key]`, raising MalformedRow if `row` is not a dict, lacks it, or its type differs."""
  if not isinstance(row, dict):
    raise MalformedRow(f'expected a JSON object, got {type(row).__name__}')
  if key not in row:
    raise MalformedRow(f'missing field {key!r}')
  value = row[key]
  if not isinstance(value, kind):
    names = '/'.join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
    raise MalformedRow(f'field {key!r} should be {names}, got {type(value).__name__}')
  return value


def read_jsonl(paths: str | Sequence[str], parse: Callable[[Any], T], *,
               skip_malformed: bool = False, max_rows: int = 0) -> Loaded[T]:
  """Parses every non-blank line of `paths` with `parse(json_object)`.

  Args:
    paths: see `expand_paths`.
    parse: turns one decoded JSON value into a row; raises MalformedRow (or KeyError,
      TypeError, ValueError) for a row it cannot use.
    skip_malformed: drop and count malformed rows instead of raising.
    max_rows: stop after this many good rows (0: read everything).

  Raises:
    ValueError: "<path>:<line>: <problem>" for the first malformed row, unless skipped.
  """
  rows, skipped = [], 0
  for path, lineno, line in _lines(expand_paths(paths)):
    if max_rows and len(rows) >= max_rows:
      break
    try:
      rows.append(parse(json.loads(line.decode('utf-8'))))
    except (MalformedRow, KeyError, TypeError, ValueError) as e:  # JSON and UTF-8 errors too.
      if not skip_malformed:
        raise ValueError(f'{path}:{lineno}: malformed row: {e}') from e
      skipped += 1
      if skipped <= _MAX_WARNINGS:
        logging.warning('%s:%d: skipping malformed row: %s', path, lineno, e)
  if skipped:
    logging.warning('skipped %d malformed rows in %s', skipped, paths)
  return Loaded(rows, skipped)


def _lines(paths: list[str]) -> Iterator[tuple[str, int, bytes]]:
  """Yields (path, 1-based line number, raw line) for every non-blank line of `paths`."""
  for path in paths:
    with open(path, 'rb') as f:  # Bytes, so a bad encoding is reported with its line.
      for lineno, line in enumerate(f, start=1):
        if line.strip():
          yield path, lineno, line

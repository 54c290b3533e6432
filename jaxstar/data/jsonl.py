"""Reading rows (jsonl lines or Hugging Face records), with errors that say where the row is.

Every row reader in `jaxstar.data` goes through `parse_rows`: a row that is not valid JSON, lacks
a field, or has a field of the wrong type either raises `MalformedRow("<path>:<line>: ...")`
or, with `skip_malformed=True`, is dropped and counted in `Loaded.num_skipped`. Input with no
usable row at all is an error naming the files (and the config field that named them): an
empty result would otherwise surface much later, far from its cause.
"""
import dataclasses
import glob
import json
import logging
import os
from typing import Any, Callable, Generic, Iterable, Iterator, Sequence, TypeVar

from jaxstar.errors import UserError

T = TypeVar('T')
_MAX_WARNINGS = 10  # Skipped rows logged individually; the rest only counted.
_MAX_NAMED_FILES = 3  # An error names this many files, then counts the rest.


class MalformedRow(UserError):
  """A row its parser cannot use; `parse_rows` re-raises it with the row's location."""


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


def field_note(config_field: str) -> str:
  """" (config field data.paths)" to end an error message with, or '' without a field."""
  return f' (config field {config_field})' if config_field else ''


def describe_paths(paths: Sequence[str]) -> str:
  """The files of an error message: all of a few, else the first few and a count."""
  if len(paths) <= _MAX_NAMED_FILES:
    return ', '.join(paths)
  return f'{", ".join(paths[:_MAX_NAMED_FILES])} and {len(paths) - _MAX_NAMED_FILES} more files'


def expand_paths(paths: str | Sequence[str], config_field: str = '') -> list[str]:
  """Expands a path, a comma-separated string of paths, or a list of paths/globs, in order.

  Raises FileNotFoundError naming any entry that matches no file, UserError if there are no
  entries; both name `config_field` when given.
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
      raise FileNotFoundError(f'no file matches {p!r}{field_note(config_field)}')
    out.extend(matches)
  if not out:
    raise UserError(f'no input paths given{field_note(config_field)}')
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


def parse_rows(located: Iterable[tuple[str, Any]], parse: Callable[[Any], T], *, source: str,
               decode: Callable[[Any], Any] | None = None, skip_malformed: bool = False,
               max_rows: int = 0, config_field: str = '') -> Loaded[T]:
  """Parses every item of `located` with `parse(decode(item))`.

  Args:
    located: (where, item) pairs; `where` ("<path>:<line>", "<dataset> row <i>") starts the
      error message of a malformed item.
    parse: turns one decoded value into a row; raises MalformedRow (or KeyError, TypeError,
      ValueError) for a row it cannot use.
    source: the input as an error should name it (files, or a dataset and split).
    decode: turns an item into the value `parse` takes (default: the item itself); its
      errors count as a malformed row.
    skip_malformed: drop and count malformed rows instead of raising.
    max_rows: stop after this many good rows (0: read everything).
    config_field: the config field that named the input, for the error messages.

  Raises:
    MalformedRow: "<where>: malformed row: <problem>" for the first malformed row, unless
      skipped.
    UserError: no good row at all (the input is empty, or every row was skipped).
  """
  rows, skipped = [], 0
  for where, item in located:
    if max_rows and len(rows) >= max_rows:
      break
    try:
      rows.append(parse(decode(item) if decode else item))
    except (MalformedRow, KeyError, TypeError, ValueError) as e:  # JSON and UTF-8 errors too.
      if not skip_malformed:
        raise MalformedRow(f'{where}: malformed row: {e}{field_note(config_field)}') from e
      skipped += 1
      if skipped <= _MAX_WARNINGS:
        logging.warning('%s: skipping malformed row: %s', where, e)
  if skipped:
    logging.warning('skipped %d malformed rows in %s', skipped, source)
  if not rows:
    problem = (f'all {skipped} rows are malformed (skip_malformed dropped them)' if skipped
               else 'empty: no rows')
    raise UserError(f'{source}: {problem}{field_note(config_field)}')
  return Loaded(rows, skipped)


def read_jsonl(paths: str | Sequence[str], parse: Callable[[Any], T], *,
               skip_malformed: bool = False, max_rows: int = 0,
               config_field: str = '') -> Loaded[T]:
  """Parses every non-blank line of the jsonl `paths` (see `expand_paths`) with `parse`.

  Errors and arguments as `parse_rows`; a malformed row is reported as "<path>:<line>: ...".
  """
  files = expand_paths(paths, config_field)
  return parse_rows(_lines(files), parse, source=describe_paths(files), decode=_decode_line,
                    skip_malformed=skip_malformed, max_rows=max_rows, config_field=config_field)


def _decode_line(line: bytes) -> Any:
  return json.loads(line.decode('utf-8'))


def _lines(paths: list[str]) -> Iterator[tuple[str, bytes]]:
  """Yields ("<path>:<1-based line number>", raw line) for every non-blank line of `paths`."""
  for path in paths:
    with open(path, 'rb') as f:  # Bytes, so a bad encoding is reported with its line.
      for lineno, line in enumerate(f, start=1):
        if line.strip():
          yield f'{path}:{lineno}', line

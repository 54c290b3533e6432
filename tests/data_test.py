"""Tests of jaxstar.data: LM pipelines (grain) and the STaR tasks, with the byte tokenizer.

Task data comes from the small fixtures in tests/testdata (the first rows of each split; see its
PROVENANCE.md) and the prompt files packaged with jaxstar, so the tests need no download.
"""
import json
import pathlib
import re
import sys
import types

import jax
import ml_collections
import numpy as np
import pytest

from jaxstar import data
from jaxstar import errors
from jaxstar import tokenizer as tokenizer_lib
from jaxstar.data import tasks

TESTDATA = pathlib.Path(__file__).resolve().parent / 'testdata'
CSQA_TRAIN = TESTDATA / 'commonsenseqa_train.jsonl'  # First 30 rows of the train split.
CSQA_DEV = TESTDATA / 'commonsenseqa_dev.jsonl'  # First 20 rows of the dev split.
GSM_TRAIN = TESTDATA / 'gsm8k_train.jsonl'  # First 30 rows of the train split.
GSM_TEST = TESTDATA / 'gsm8k_test.jsonl'  # First 20 rows of the test split.


@pytest.fixture(scope='module')
def tok():
  return tokenizer_lib.get_tokenizer('bytes')


def _docs(n):
  """Distinct documents of varied length (3..~60 bytes)."""
  return [f'doc{i}:' + 'abcdefghij'[i % 10] * (i * 7 % 53) for i in range(n)]


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_batches_equal(xs, ys):
  assert len(xs) == len(ys)
  for x, y in zip(xs, ys):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


# ------------------------------------------------------------------------------- crop / pad


def test_crop_or_pad_short_document_is_right_padded(tok):
  ids = tok.encode('hello', bos=True)
  row = data.crop_or_pad(ids, 8, tok.pad_id, np.random.default_rng(0))
  assert row['tokens'].dtype == np.int32 and row['tokens'].shape == (8,)
  np.testing.assert_array_equal(row['tokens'], ids + [tok.pad_id] * 2)
  np.testing.assert_array_equal(row['mask'], [1] * 6 + [0] * 2)
  assert ids[0] == tok.bos_id == 1 and tok.pad_id == 2


def test_crop_or_pad_long_document_is_a_window(tok):
  ids = tok.encode('the quick brown fox jumps over the lazy dog', bos=True)
  starts = set()
  for seed in range(20):
    row = data.crop_or_pad(ids, 10, tok.pad_id, np.random.default_rng(seed))
    np.testing.assert_array_equal(row['mask'], np.ones(10))
    window = row['tokens'].tolist()
    start = next(s for s in range(len(ids) - 9) if ids[s:s + 10] == window)
    starts.add(start)
  assert len(starts) > 5  # Offsets are random ...
  a = data.crop_or_pad(ids, 10, tok.pad_id, np.random.default_rng([3, 7]))
  b = data.crop_or_pad(ids, 10, tok.pad_id, np.random.default_rng([3, 7]))
  np.testing.assert_array_equal(a['tokens'], b['tokens'])  # ... and reproducible.


def test_crop_pad_pipeline_shapes_and_fixed_crops(tok):
  docs = _docs(12)
  p = data.lm_dataset(docs, tok, seq_len=16, global_batch_size=12, seed=5, num_epochs=2)
  assert len(p.dataset) == 2 and p.local_batch_size == 12 and p.rows_per_epoch == 12
  epoch1, epoch2 = p.dataset[0], p.dataset[1]
  assert epoch1['tokens'].shape == (12, 16) and epoch1['mask'].shape == (12, 16)
  assert epoch1['tokens'].dtype == np.int32 and epoch1['mask'].dtype == np.int32
  # Every row is BOS-first (short) or a window (long); padding only where the mask is 0.
  for tokens, mask in zip(epoch1['tokens'], epoch1['mask']):
    n = int(mask.sum())
    np.testing.assert_array_equal(mask, np.arange(16) < n)
    assert (tokens[n:] == tok.pad_id).all()
  # The crop is fixed for the run: both epochs hold the same rows, in a different order.
  rows = lambda b: sorted(map(tuple, b['tokens'].tolist()))
  assert rows(epoch1) == rows(epoch2)
  assert epoch1['tokens'].tolist() != epoch2['tokens'].tolist()
  expected = []
  for i, d in enumerate(docs):
    expected.append(tuple(data.crop_or_pad(tok.encode(d, bos=True), 16, tok.pad_id,
                                           np.random.default_rng([5, i]))['tokens'].tolist()))
  assert rows(epoch1) == sorted(expected)


# ------------------------------------------------------------------------------------ pack


def test_pack_rows_and_segment_ids(tok):
  docs = ['ab', 'cde', 'f', 'ghijk']
  tokens, segs = data.pack_rows([tok.encode(d, bos=True) for d in docs], 5, tok.eos_id)
  stream = sum((tok.encode(d, bos=True, eos=True) for d in docs), [])
  assert tokens.shape == (len(stream) // 5, 5)
  np.testing.assert_array_equal(tokens.reshape(-1), stream[:tokens.size])
  # Row 0 = [BOS a b EOS BOS] -> docs 0,0,0,0,1; every row numbers its documents from 1.
  np.testing.assert_array_equal(segs[0], [1, 1, 1, 1, 2])
  assert (segs[:, 0] == 1).all()
  with pytest.raises(ValueError, match='fewer than one row'):
    data.pack_rows([tok.encode('a', bos=True)], 64, tok.eos_id)


def test_pack_pipeline_always_has_segment_ids(tok):
  docs = _docs(20)
  p = data.lm_dataset(docs, tok, seq_len=32, global_batch_size=4, mode='pack', num_epochs=1)
  b = p.dataset[0]
  assert set(b) == {'tokens', 'mask', 'segment_ids'}
  assert b['tokens'].shape == b['mask'].shape == b['segment_ids'].shape == (4, 32)
  assert b['segment_ids'].dtype == np.int32
  assert (b['mask'] == 1).all()
  assert len(p.dataset) == p.rows_per_epoch // 4
  # Each shuffled row keeps the segment ids `pack_rows` gave it.
  tokens, segs = data.pack_rows([tok.encode(d, bos=True) for d in docs], 32, tok.eos_id)
  expected = {tuple(t): tuple(s) for t, s in zip(tokens.tolist(), segs.tolist())}
  assert len(expected) == len(tokens)  # Rows are distinct, so the lookup is unambiguous.
  for batch in p.dataset:
    for t, s in zip(batch['tokens'].tolist(), batch['segment_ids'].tolist()):
      assert expected[tuple(t)] == tuple(s)
  # crop_pad rows are one document each: no segment ids. The option to drop them is gone.
  crop = data.lm_dataset(docs, tok, seq_len=32, global_batch_size=4, num_epochs=1)
  assert set(crop.dataset[0]) == {'tokens', 'mask'}
  with pytest.raises(TypeError):
    data.lm_dataset(docs, tok, seq_len=32, global_batch_size=4, mode='pack',
                    segment_ids=True)  # pylint: disable=unexpected-keyword-arg
  from_cfg = data.lm_dataset_from_config(
      dict(source='synthetic', synthetic_docs=20, mode='pack', seq_len=32), tok, 4)
  assert set(from_cfg.dataset[0]) == {'tokens', 'mask', 'segment_ids'}


# ---------------------------------------------------------------- shuffle, epochs, sharding


def test_shuffle_is_deterministic_given_the_seed(tok):
  make = lambda seed: data.lm_dataset(_docs(16), tok, seq_len=8, global_batch_size=4,
                                      seed=seed, num_epochs=3)
  a, b, c = make(1), make(1), make(2)
  _assert_batches_equal(list(a.dataset), list(b.dataset))
  assert a.dataset[0]['tokens'].tolist() != c.dataset[0]['tokens'].tolist()
  assert len(a.dataset) == 12  # 3 epochs x 16 rows / 4.


def test_infinite_repeat(tok):
  p = data.lm_dataset(_docs(5), tok, seq_len=8, global_batch_size=2)
  batches = _take(p.iterator(), 7)  # 14 rows: past the end of the 5 documents twice.
  assert all(b['tokens'].shape == (2, 8) for b in batches)


@pytest.mark.parametrize('process_count', [2, 4])
@pytest.mark.parametrize('num_epochs', [1, 0])
def test_process_shards_partition_the_global_batch(tok, process_count, num_epochs):
  # 21 uncropped, distinct rows per epoch; one epoch leaves 5 rows that fill no global batch.
  kw = dict(seq_len=64, global_batch_size=8, seed=3, num_epochs=num_epochs)
  docs = _docs(21)
  steps = 2 if num_epochs else 5
  single = _take(data.lm_dataset(docs, tok, **kw).iterator(), steps)
  shards = [data.lm_dataset(docs, tok, process_index=p, process_count=process_count, **kw)
            for p in range(process_count)]
  if num_epochs:  # Every process stops after the same number of steps.
    assert [len(s.dataset) for s in shards] == [steps] * process_count
  shards = [_take(s.iterator(), steps) for s in shards]
  seen = []
  for step, full in enumerate(single):
    parts = [s[step] for s in shards]
    assert all(part['tokens'].shape == (8 // process_count, 64) for part in parts)
    for k in full:
      np.testing.assert_array_equal(np.concatenate([part[k] for part in parts]), full[k])
    seen += [tuple(r) for part in parts for r in part['tokens'].tolist()]
  if num_epochs:
    assert len(set(seen)) == len(seen) == 16  # Disjoint rows, none repeated within the epoch.


def test_iterator_state_resumes_exactly(tok):
  make = lambda: data.lm_dataset(_docs(10), tok, seq_len=16, global_batch_size=4, seed=9)
  it = make().iterator()
  _take(it, 3)
  state = json.loads(json.dumps(it.get_state()))  # What a checkpoint would store.
  expected = _take(it, 5)  # Crosses the epoch boundary at row 10.
  resumed = make().iterator()
  resumed.set_state(state)
  _assert_batches_equal(_take(resumed, 5), expected)
  _assert_batches_equal(_take(make().iterator(), 8)[3:], expected)


def test_make_global_batch(tok):
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ('data',))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  local = data.lm_dataset(_docs(8), tok, seq_len=8, global_batch_size=8).dataset[0]
  batch = data.make_global_batch(local, sharding)
  for k, v in local.items():
    assert isinstance(batch[k], jax.Array) and batch[k].sharding == sharding
    np.testing.assert_array_equal(np.asarray(batch[k]), v)


def test_bad_pipeline_arguments(tok):
  with pytest.raises(errors.UserError, match='not divisible'):
    data.lm_dataset(_docs(8), tok, seq_len=8, global_batch_size=6, process_count=4)
  with pytest.raises(errors.UserError, match=r"mode 'bogus' \(data\.mode\); valid: crop_pad, pack"):
    data.lm_dataset(_docs(8), tok, seq_len=8, global_batch_size=4, mode='bogus')
  with pytest.raises(errors.UserError,
                     match=r"source 'bogus' \(data\.source\); valid: synthetic, jsonl, hf"):
    data.lm_dataset_from_config(dict(source='bogus'), tok, 4)
  with pytest.raises(errors.UserError, match='needs data.paths'):
    data.lm_dataset_from_config(dict(source='jsonl'), tok, 4)
  with pytest.raises(errors.UserError, match='no documents'):
    data.lm_dataset([], tok, seq_len=8, global_batch_size=4)


# ------------------------------------------------------------------------- config sources


def test_synthetic_source_from_config(tok):
  cfg = ml_collections.ConfigDict(dict(
      source='synthetic', seq_len=24, synthetic_docs=30, synthetic_max_digits=3, max_docs=10,
      seed=0, num_epochs=1, unrelated_field='other modules read this'))
  p = data.lm_dataset_from_config(cfg, tok, global_batch_size=5)
  assert p.num_docs == 10 and len(p.dataset) == 2
  doc = data.synthetic_arithmetic_doc(4, seed=0, max_digits=3)
  assert doc == data.synthetic_arithmetic_doc(4, seed=0, max_digits=3)
  for line in doc.splitlines():
    lhs, total = line.split('=')
    a, b = lhs.split('+')
    assert int(a) + int(b) == int(total) and max(len(a), len(b)) <= 3


def test_scratchpad_source_is_star_addition_samples(tok):
  cfg = dict(source='synthetic', synthetic_format='scratchpad', synthetic_min_digits=2,
             synthetic_max_digits=3, synthetic_blocks=3, synthetic_docs=40, seq_len=512,
             num_epochs=1, seed=3)
  p = data.lm_dataset_from_config(cfg, tok, global_batch_size=4)
  assert p.num_docs == 40 and len(p.dataset) == 10
  lengths = set()
  for i in range(40):
    doc = data.lm.scratchpad_doc(i, seed=3, min_digits=2, max_digits=3, blocks=3)
    blocks = doc.split('\n\n')
    assert len(blocks) == 3
    sizes = set()
    for block in blocks:
      lines = block.split('\n')
      assert lines[0] == 'Input:' and lines[2] == 'Target:' and lines[3] == '<scratch>'
      a, b = (int(x.replace(' ', '')) for x in lines[1].split(' + '))
      sizes.add(len(str(a)))
      assert lines[-2] == '</scratch>' and lines[-1] == tasks.addition_answer(a, b)
      assert tasks.check_arithmetic('\n'.join(lines[3:]), tasks.addition_answer(a, b))
    assert len(sizes) == 1           # one digit count per document
    lengths |= sizes
  assert lengths == {2, 3}
  hinted = [data.lm.scratchpad_doc(i, seed=3, blocks=2, hint_fraction=0.5) for i in range(40)]
  assert 10 < sum('Target: ' in d for d in hinted) < 30
  for d in hinted:
    if 'Target: ' in d:
      for block in d.split('\n\n'):
        assert block.split('\n')[2] == 'Target: ' + block.split('\n')[-1]
  for bad, match in [(dict(synthetic_min_digits=4), r'min_digits=4 .*max_digits=3'),
                     (dict(synthetic_blocks=0), r'synthetic_blocks must be >= 1'),
                     (dict(synthetic_format='poems'), r"synthetic_format='poems'")]:
    with pytest.raises(errors.UserError, match=match):
      data.lm_dataset_from_config({**cfg, **bad}, tok, global_batch_size=4)


def _write_jsonl(path, lines):
  path.write_text('\n'.join(lines) + '\n')
  return str(path)


def test_jsonl_source_malformed_rows(tok, tmp_path):
  good = [json.dumps({'text': f'document number {i}'}) for i in range(6)]
  bad_json = _write_jsonl(tmp_path / 'a.jsonl', good[:2] + ['{"text": oops'] + good[2:])
  with pytest.raises(errors.UserError, match=r'a\.jsonl:3: malformed row'):
    data.jsonl_docs(bad_json)
  missing = _write_jsonl(tmp_path / 'b.jsonl', good[:4] + ['{"body": "x"}'])
  with pytest.raises(ValueError, match=r"b\.jsonl:5: .*missing field 'text'"):
    data.jsonl_docs(missing)
  (tmp_path / 'd.jsonl').write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
  with pytest.raises(ValueError, match=r'd\.jsonl:2: .*utf-8'):
    data.jsonl_docs(str(tmp_path / 'd.jsonl'))
  wrong_type = _write_jsonl(tmp_path / 'c.jsonl', ['{"text": 7}'])
  with pytest.raises(ValueError, match=r"c\.jsonl:1: .*should be str"):
    data.jsonl_docs(wrong_type)

  cfg = dict(source='jsonl', paths=f'{tmp_path}/a.jsonl,{tmp_path}/[bc].jsonl',
             skip_malformed=True, seq_len=16, num_epochs=1)
  p = data.lm_dataset_from_config(cfg, tok, global_batch_size=2)
  assert p.num_skipped == 3 and p.num_docs == 6 + 4
  assert len(p.dataset) == 5
  assert data.jsonl_docs([bad_json], skip_malformed=True, max_docs=3).rows == [
      f'document number {i}' for i in range(3)]


def test_hf_source_without_datasets_package(tok, monkeypatch):
  monkeypatch.setitem(sys.modules, 'datasets', None)  # Make `import datasets` fail.
  with pytest.raises(ImportError, match=r'pip install -e \.\[hf\]'):
    data.lm_dataset_from_config(dict(source='hf', paths='some/dataset'), tok, 4)


def test_empty_inputs_name_the_files_and_config_fields(tok, tmp_path, monkeypatch):
  empty = tmp_path / 'empty.jsonl'
  empty.write_text('\n  \n')  # Blank lines only.
  with pytest.raises(errors.UserError, match=re.escape(
      f'{empty}: empty: no rows (config field data.paths)')):
    data.lm_dataset_from_config(dict(source='jsonl', paths=str(empty)), tok, 4)
  bad = _write_jsonl(tmp_path / 'bad.jsonl', ['{"body": 1}', 'not json'])
  with pytest.raises(errors.UserError,
                     match=rf'{re.escape(bad)}: all 2 rows are malformed .*data\.paths'):
    data.lm_dataset_from_config(dict(source='jsonl', paths=bad, skip_malformed=True), tok, 4)
  with pytest.raises(FileNotFoundError, match=r"nowhere\.jsonl.*data\.paths"):
    data.lm_dataset_from_config(dict(source='jsonl', paths=str(tmp_path / 'nowhere.jsonl')),
                                tok, 4)
  two = _write_jsonl(tmp_path / 'two.jsonl', ['{"text": "a"}', '{"text": "b"}'])
  with pytest.raises(errors.UserError,
                     match=r'skip_docs=2 leaves no document of the 2 documents of .*two\.jsonl'):
    data.lm_dataset_from_config(dict(source='jsonl', paths=two, skip_docs=2), tok, 4)
  with pytest.raises(errors.UserError, match=r'skip_docs=5 .* 5 synthetic .*synthetic_docs'):
    data.lm_dataset_from_config(dict(source='synthetic', synthetic_docs=5, skip_docs=5), tok, 4)
  with pytest.raises(errors.UserError, match=r'data\.synthetic_docs must be >= 1'):
    data.lm_dataset_from_config(dict(source='synthetic', synthetic_docs=0), tok, 4)
  monkeypatch.setitem(sys.modules, 'datasets', _fake_datasets({('some/corpus', None): []}))
  for max_docs in (0, 3):  # Read by index, and streamed.
    with pytest.raises(errors.UserError, match=r'some/corpus\[train\]: no rows'):
      data.lm_dataset_from_config(dict(source='hf', paths='some/corpus', max_docs=max_docs),
                                  tok, 4)


class _FakeDataset(list):
  """The little of a `datasets.Dataset` (and its streaming form) that jaxstar.data uses."""

  @property
  def column_names(self):
    return list(self[0]) if self else []

  def skip(self, n):
    return _FakeDataset(self[n:])

  def take(self, n):
    return _FakeDataset(self[:n])


def _fake_datasets(tables):
  """A stand-in `datasets` module: `load_dataset` serves `tables[(name, config)]`, any split."""
  module = types.ModuleType('datasets')
  module.calls = []
  def load_dataset(name, config=None, *, split, streaming=False):
    module.calls.append((name, config, split))
    del streaming
    return _FakeDataset(tables[name, config])
  module.load_dataset = load_dataset
  return module


# ----------------------------------------------------------------------------------- tasks


def test_csqa_loader_and_query_format():
  dev = tasks.load_csqa(str(CSQA_DEV))
  assert len(dev) == 20 and dev.num_skipped == 0  # Every row of the fixture.
  train = tasks.load_csqa(str(CSQA_TRAIN))
  assert len(train) == 30 and train.num_skipped == 0
  assert all(len(ex.choices) == 5 and ex.answer in 'ABCDE' for ex in [*dev, *train])
  ex = dev[0]
  assert ex.answer == 'A' and ex.choices[0] == ('A', 'bank') and len(ex.choices) == 5
  q = tasks.format_csqa_query(ex)
  assert q.startswith('Q: A revolving door is convenient') and q.endswith('(e) new york\nA:')
  assert '(a) bank (CORRECT)\n' in tasks.format_csqa_query(ex, hint=True)
  assert tasks.format_csqa_query(ex, hint=True).count('(CORRECT)') == 1


def test_csqa_query_matches_the_prompt_files():
  plain, hinted = (tasks.packaged_prompts('commonsenseqa', kind)
                   for kind in ('rationale', 'answer_key'))
  assert len(plain) == len(hinted) == 7
  for block, hint_block in zip(plain, hinted):
    lines = block.split('\n')
    query_end = lines.index(next(l for l in lines if l.startswith('A: ')))
    letter = tasks.extract_csqa_answer(lines[query_end][3:], fallback=False)
    choices = tuple((l[1].upper(), l[4:]) for l in lines[2:query_end])
    ex = tasks.Example(question=lines[0][3:], answer=letter, choices=choices)
    assert tasks.format_csqa_query(ex) == '\n'.join(lines[:query_end]) + '\nA:'
    assert hint_block.startswith(tasks.format_csqa_query(ex, hint=True))


def test_gsm8k_loader_query_format_and_prompt_file(tmp_path):
  test = tasks.load_gsm8k(str(GSM_TEST))
  assert len(test) == 20  # Every row of the fixture.
  assert test[0].answer == '18' and test[0].solution.endswith('#### 18')
  train = tasks.load_gsm8k(str(GSM_TRAIN))
  assert len(train) == 30
  train0 = tasks.load_gsm8k(str(GSM_TRAIN), max_rows=1)[0]
  assert train0 == train[0]
  plain = tasks.packaged_prompts('gsm8k', 'rationale')
  hinted = tasks.packaged_prompts('gsm8k', 'answer_key')
  assert len(plain) == len(hinted) == 6
  # The exemplars are train rows 0, 2, 3, 5, 8 and 9 with their gold solutions.
  for block, hint_block, ex in zip(plain, hinted, (train[i] for i in (0, 2, 3, 5, 8, 9))):
    assert block == tasks.format_gsm8k_query(ex) + ' ' + ex.solution
    assert hint_block == tasks.format_gsm8k_query(ex, hint=True) + ' ' + ex.solution
  whole = tasks.format_gsm8k_query(train0, hint=True, hint_whole_solution=True)
  assert whole == f'Q: {train0.question} ({train0.solution})\nA:'
  ctx = tasks.few_shot_context(plain, tasks.format_gsm8k_query(test[0]))
  assert ctx.endswith('#### 990\n\nQ: ' + test[0].question + '\nA:')


def test_task_loaders_malformed_rows(tmp_path):
  row = json.loads(CSQA_DEV.read_text().split('\n', 1)[0])
  no_stem = json.loads(json.dumps(row))
  del no_stem['question']['stem']
  bad_key = dict(row, answerKey='Z')
  path = _write_jsonl(tmp_path / 'csqa.jsonl', [json.dumps(row), json.dumps(no_stem),
                                                json.dumps(row), json.dumps(bad_key), '[1]'])
  with pytest.raises(data.MalformedRow, match=r"csqa\.jsonl:2: .*missing field 'stem'"):
    tasks.load_csqa(path)
  assert issubclass(data.MalformedRow, errors.UserError)
  loaded = tasks.load_csqa(path, skip_malformed=True)
  assert len(loaded) == 2 and loaded.num_skipped == 3
  gsm = _write_jsonl(tmp_path / 'gsm.jsonl', ['{"question": "q", "answer": "no marker"}'])
  with pytest.raises(errors.UserError, match=r'gsm\.jsonl:1: .*####'):
    tasks.load_gsm8k(gsm)
  # No usable row: the error names the file (and the config field, when the caller gives it).
  with pytest.raises(errors.UserError, match=rf'{re.escape(gsm)}: all 1 rows are malformed'):
    tasks.load_gsm8k(gsm, skip_malformed=True)
  (tmp_path / 'empty.jsonl').write_text('')
  with pytest.raises(errors.UserError,
                     match=r'empty\.jsonl: empty: no rows \(config field star\.train_path\)'):
    tasks.load_csqa(str(tmp_path / 'empty.jsonl'), config_field='star.train_path')


def test_packaged_prompts():
  for task, kinds in tasks.PROMPT_FILES.items():
    for kind in kinds:
      exemplars = tasks.packaged_prompts(task, kind)
      assert len(exemplars) == (7 if task == 'commonsenseqa' else 6)
      assert all(block.startswith('Q: ') for block in exemplars)
  hinted = tasks.packaged_prompts('commonsenseqa', 'direct_answer_key')
  assert all(block.count(tasks.CSQA_HINT) == 1 for block in hinted)
  assert not any(tasks.CSQA_HINT in b for b in tasks.packaged_prompts('commonsenseqa', 'direct'))
  assert tasks.packaged_prompts('gsm8k') == tasks.packaged_prompts('gsm8k', 'rationale')
  with pytest.raises(errors.UserError, match=r"task 'mmlu'; valid tasks: commonsenseqa, gsm8k"):
    tasks.packaged_prompts('mmlu')
  with pytest.raises(errors.UserError,
                     match=r"kind 'direct'; valid kinds: rationale, answer_key$"):
    tasks.packaged_prompts('gsm8k', 'direct')


def test_load_prompts_reads_a_path(tmp_path):
  path = tmp_path / 'mine.txt'
  path.write_text('\n\nQ: one\nA: 1\n\n\n\nQ: two\nA: 2\n')
  assert tasks.load_prompts(str(path)) == ['Q: one\nA: 1', 'Q: two\nA: 2']
  path.write_text('\n\n')
  with pytest.raises(errors.UserError, match=rf'{re.escape(str(path))}: no prompt exemplars'):
    tasks.load_prompts(str(path))
  with pytest.raises(FileNotFoundError):
    tasks.load_prompts(str(tmp_path / 'missing.txt'))


def _csqa_as_hf(row):
  """A CommonsenseQA jsonl row in the flat form of the Hub's `tau/commonsense_qa`."""
  q = row['question']
  return {'id': row['id'], 'question': q['stem'], 'question_concept': q['question_concept'],
          'choices': {'label': [c['label'] for c in q['choices']],
                      'text': [c['text'] for c in q['choices']]},
          'answerKey': row['answerKey']}


def test_load_task_from_a_path_or_the_hub(monkeypatch):
  csqa = tasks.load_task('commonsenseqa', 'validation', str(CSQA_DEV))
  assert csqa.rows == tasks.load_csqa(str(CSQA_DEV)).rows
  gsm = tasks.load_task('gsm8k', 'test', [str(GSM_TEST)], max_rows=5)
  assert gsm.rows == tasks.load_gsm8k(str(GSM_TEST)).rows[:5]

  csqa_rows = [json.loads(line) for line in CSQA_DEV.read_text().splitlines()[:3]]
  gsm_rows = [json.loads(line) for line in GSM_TRAIN.read_text().splitlines()[:2]]
  fake = _fake_datasets({('tau/commonsense_qa', None): [_csqa_as_hf(r) for r in csqa_rows],
                         ('openai/gsm8k', 'main'): gsm_rows})
  monkeypatch.setitem(sys.modules, 'datasets', fake)
  hub_csqa = tasks.load_task('commonsenseqa', 'validation')
  assert hub_csqa.rows == csqa.rows[:3]
  assert [ex.raw for ex in hub_csqa] == csqa_rows  # The nested jsonl form, key for key.
  hub_gsm = tasks.load_task('gsm8k', 'train')
  assert hub_gsm.rows == tasks.load_gsm8k(str(GSM_TRAIN)).rows[:2]
  assert fake.calls == [('tau/commonsense_qa', None, 'validation'),
                        ('openai/gsm8k', 'main', 'train')]

  broken = dict(_csqa_as_hf(csqa_rows[0]), choices={'label': ['A', 'B'], 'text': ['x']})
  fake = _fake_datasets({('tau/commonsense_qa', None): [_csqa_as_hf(csqa_rows[1]), broken],
                         ('openai/gsm8k', 'main'): []})
  monkeypatch.setitem(sys.modules, 'datasets', fake)
  with pytest.raises(data.MalformedRow,
                     match=r'tau/commonsense_qa\[train\] row 1: .*one length'):
    tasks.load_task('commonsenseqa', 'train')
  assert len(tasks.load_task('commonsenseqa', 'train', skip_malformed=True)) == 1
  with pytest.raises(errors.UserError, match=r'openai/gsm8k\[test\]: empty: no rows'):
    tasks.load_task('gsm8k', 'test')


def test_load_task_errors(monkeypatch):
  with pytest.raises(errors.UserError, match=r"task 'mmlu'; valid: commonsenseqa, gsm8k"):
    tasks.load_task('mmlu', 'train', str(CSQA_DEV))
  with pytest.raises(errors.UserError, match=r"no split 'dev'; valid: train, validation"):
    tasks.load_task('commonsenseqa', 'dev', str(CSQA_DEV))
  with pytest.raises(errors.UserError, match=r"no split 'validation'; valid: train, test"):
    tasks.load_task('gsm8k', 'validation')
  monkeypatch.setitem(sys.modules, 'datasets', None)  # Make `import datasets` fail.
  with pytest.raises(ImportError, match=r'pip install -e \.\[hf\]; or pass the path .*'
                                        r'config field star\.eval_path'):
    tasks.load_task('gsm8k', 'test', config_field='star.eval_path')
  assert len(tasks.load_task('gsm8k', 'test', str(GSM_TEST))) == 20  # A path needs no Hub.


@pytest.mark.parametrize('a,b', [('1,080', '1080'), ('$5', '5'), ('72.0', '72'),
                                 (' 18 ', '18'), ('-3', '-3'), ('$1,000.00', '1000'),
                                 ('42.', '42')])
def test_gsm8k_normalization(a, b):
  assert tasks.normalize_number(a) == tasks.normalize_number(b)


def test_gsm8k_checker():
  gen = 'She has 1080 apples.\n#### 1080\nQ: next question\n#### 7'
  assert tasks.extract_gsm8k_answer(gen) == '1080'
  assert tasks.check_gsm8k(gen, '1,080')
  assert not tasks.check_gsm8k(gen, '1,080', normalize=False)  # The official raw compare.
  assert tasks.check_gsm8k(gen, '1080', normalize=False)
  assert not tasks.check_gsm8k('no marker here', '5')
  assert not tasks.check_gsm8k('#### 5', '6')
  assert tasks.extract_gsm8k_answer('x<|endoftext|>\n#### 5') is None
  # Round trip: every gold solution checks against its own gold answer, raw and normalized.
  for ex in [*tasks.load_gsm8k(str(GSM_TEST)), *tasks.load_gsm8k(str(GSM_TRAIN))]:
    assert tasks.check_gsm8k(ex.solution, ex.answer)
    assert tasks.check_gsm8k(ex.solution, tasks.gsm8k_final_answer(ex.solution),
                             normalize=False)


def test_csqa_checker():
  gen = ' The answer must be a bank. Therefore, the answer is bank (a).\nQ: next (b).'
  assert tasks.extract_csqa_answer(gen) == 'A'
  assert tasks.check_csqa(gen, 'a') and tasks.check_csqa(gen, 'A')
  assert not tasks.check_csqa(gen, 'B')
  loose = ' Therefore, the answer is (c) mall'
  assert tasks.extract_csqa_answer(loose, fallback=False) is None
  assert tasks.check_csqa(loose, 'C')
  assert tasks.extract_csqa_answer('no letter at all') is None
  assert tasks.extract_csqa_answer('bank (b).<|endoftext|>junk') == 'B'


def test_addition_scratchpad_matches_the_spec_example():
  assert tasks.format_addition(15, 43) == (
      'Input:\n'
      '1 5 + 4 3\n'
      'Target:\n'
      '<scratch>\n'
      '1 5 + 4 3 , C: 0\n'
      '1 + 4 , 8 C: 0\n'
      ', 5 8 C: 0\n'
      '0 5 8\n'
      '</scratch>\n'
      '5 8')
  assert tasks.format_addition(15, 43, scratchpad=False) == 'Input:\n1 5 + 4 3\nTarget:\n5 8'
  assert tasks.addition_scratchpad(99, 99).split('\n')[-3:] == [', 9 8 C: 1', '1 9 8',
                                                                '</scratch>']
  assert tasks.addition_answer(99, 99) == '1 9 8'
  with pytest.raises(ValueError, match='same'):
    tasks.addition_scratchpad(5, 43)


def test_addition_generator_and_checker():
  exs = tasks.generate_addition(50, 4, seed=1)
  assert exs == tasks.generate_addition(50, 4, seed=1)
  assert exs != tasks.generate_addition(50, 4, seed=2)
  for ex in exs:
    a, b = ex.raw['a'], ex.raw['b']
    assert 1000 <= a < 10000 and 1000 <= b < 10000
    assert ex.answer.replace(' ', '') == str(a + b)
    query = tasks.addition_query(a, b)
    for scratch, direct in ((True, False), (False, True)):
      generated = tasks.format_addition(a, b, scratch)[len(query):]  # What the model writes.
      assert tasks.check_arithmetic(generated, ex.answer, direct=direct)
      assert tasks.check_arithmetic(generated + '\n\nInput:\n1 + 2', ex.answer, direct=direct)
  sample = tasks.addition_sample([(15, 43), (2, 3)])
  assert sample.split('\n\n')[1] == tasks.format_addition(2, 3)
  assert tasks.extract_arithmetic_answer('5 8\n<|endoftext|>') == '5 8'
  assert not tasks.check_arithmetic('\n<scratch>\n0 5 8\n</scratch>\n5 9', '5 8')


def test_skip_docs_gives_the_documents_after_a_training_subset(tmp_path):
  tok = tokenizer_lib.get_tokenizer('bytes')
  path = tmp_path / 'docs.jsonl'
  path.write_text(''.join(json.dumps({'text': f'doc {i}'}) + '\n' for i in range(30)))
  cfg = dict(source='jsonl', paths=str(path), seq_len=12, num_epochs=1)
  held_out = data.lm_dataset_from_config({**cfg, 'skip_docs': 20, 'max_docs': 8}, tok, 4)
  texts = {tok.decode(row) for batch in held_out.iterator() for row in batch['tokens']}
  assert texts == {f'doc {i}' for i in range(20, 28)}
  synthetic = data.lm_dataset_from_config(
      dict(source='synthetic', synthetic_docs=50, skip_docs=45, seq_len=8), tok, 4)
  assert synthetic.num_docs == 5

"""Data: LM text pipelines (the only grain user) and the STaR QA tasks.

  lm      synthetic / jsonl / Hugging Face documents -> cropped-padded or packed, shuffled,
          process-sharded, checkpointable batches; `make_global_batch` for jit inputs.
  tasks   CommonsenseQA, GSM8K and addition: loaders (jsonl or the Hugging Face Hub), query
          formats, hints, answer checkers, the packaged few-shot prompts (prompts/).
  jsonl   row reading shared by both, with errors that name the file and line (malformed rows
          raise or are counted; input without a good row raises).

The `lm` names load grain on first use only, so tasks and evaluation run without it.
"""
import importlib
from jaxstar.data.jsonl import Loaded, MalformedRow, expand_paths, parse_rows, read_jsonl
from jaxstar.data.tasks import (
    Example, addition_answer, addition_query, addition_sample, addition_scratchpad,
    check_arithmetic, check_csqa, check_gsm8k, extract_arithmetic_answer, extract_csqa_answer,
    extract_gsm8k_answer, few_shot_context, format_addition, format_csqa_query,
    format_gsm8k_query, generate_addition, gsm8k_final_answer, load_csqa, load_gsm8k,
    load_prompts, load_task, normalize_number, packaged_prompts)

_LM_NAMES = ('LMPipeline', 'crop_or_pad', 'hf_docs', 'jsonl_docs', 'lm_dataset',
             'lm_dataset_from_config', 'make_global_batch', 'pack_rows',
             'synthetic_arithmetic_doc', 'synthetic_docs')


def __getattr__(name):
  if name in _LM_NAMES:
    return getattr(importlib.import_module('jaxstar.data.lm'), name)
  raise AttributeError(f"module 'jaxstar.data' has no attribute {name!r}")

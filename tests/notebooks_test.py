"""The colab/ notebooks: stored without outputs, and each runs end to end on its tiny variant.
(The STaR notebook runs in star_stage_test.py, on that module's pretrained base model.)"""
import os
import re

import pytest

from tests import notebooks


@pytest.mark.parametrize("name", sorted(n for n in os.listdir(notebooks.COLAB)
                                        if n.endswith(".ipynb")))
def test_notebooks_are_stored_without_outputs(name):
  nb = notebooks.read(name)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert code and all(c.outputs == [] and c.execution_count is None for c in code), name


@pytest.mark.slow
def test_quietstar_notebook_shows_thoughts_rewards_and_mixing_weights(tmp_path, monkeypatch):
  sentence = "17+25=42\n"
  nb = notebooks.execute("quietstar_demo.ipynb", monkeypatch, WORKDIR=str(tmp_path),
                         PRETRAIN_STEPS=20, QUIETSTAR_STEPS=4, SENTENCE=sentence)
  text = notebooks.text_output(nb)
  assert (tmp_path / "quietstar" / "checkpoints").is_dir()
  counts = re.search(r"(\d+) tokens, (\d+) positions scored", text)
  assert counts and int(counts.group(2)) == int(counts.group(1)) - 2 > 0, text[-2000:]
  rows = [line for line in text.splitlines() if line[:3].strip().isdigit()]
  assert len(rows) == int(counts.group(2))      # a thought, weight and reward per position
  assert "reward of the thought before each token" in text and "background:rgba" in text
  assert "mixing weight on the thought" in text and "mean mixing weight:" in text


@pytest.mark.slow
def test_mistral_notebook_runs_its_tiny_variant(tmp_path, monkeypatch):
  nb = notebooks.execute("mistral_7b_quietstar.ipynb", monkeypatch, TINY=True,
                         WORKDIR=str(tmp_path), MAX_NEW_TOKENS=6, PROMPT="12+34=")
  text = notebooks.text_output(nb)
  assert (tmp_path / "tiny_hf" / "config.json").is_file()
  assert "after thinking" in text and "mixing weight 0.000" in text
  assert "with untrained thoughts the text equals plain generation" in text

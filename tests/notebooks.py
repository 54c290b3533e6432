"""Runs a notebook of colab/ as a user would, with its parameter cell overridden (nbclient)."""
import os

import nbformat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLAB = os.path.join(ROOT, "colab")


def read(name: str):
  return nbformat.read(os.path.join(COLAB, name), as_version=4)


def execute(name: str, monkeypatch, **params):
  """Executes colab/`name` in a fresh kernel with `params` appended to its "parameters" cell;
  returns the executed notebook. The kernel sees one CPU device, as a laptop or Colab CPU does,
  and starts in colab/ (where a user opens the notebook)."""
  from nbclient import NotebookClient  # pylint: disable=g-import-not-at-top
  nb = read(name)
  cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
  assert len(cells) == 1, f"{name}: one cell tagged 'parameters' expected"
  cells[0].source += "".join(f"\n{k} = {v!r}" for k, v in params.items())
  monkeypatch.setenv("XLA_FLAGS", "")
  NotebookClient(nb, timeout=900, kernel_name="python3",
                 resources={"metadata": {"path": COLAB}}).execute()
  return nb


def text_output(nb) -> str:
  """Everything the executed notebook printed or displayed as text or HTML."""
  parts = []
  for cell in nb.cells:
    for out in cell.get("outputs", []):
      if out.get("output_type") == "stream":
        parts.append(out["text"])
      for kind in ("text/plain", "text/html"):
        if kind in out.get("data", {}):
          parts.append(out["data"][kind])
  return "\n".join(parts)

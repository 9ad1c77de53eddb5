"""The walkthrough notebook (docs/walkthrough.ipynb) runs top to bottom on SmolLM2 (nbclient)."""
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
pytestmark = pytest.mark.real


def test_notebook_is_generated_from_its_script():
    import nbformat

    import sys
    sys.path.insert(0, str(DOCS))
    from make_walkthrough import build

    saved = nbformat.read(DOCS / "walkthrough.ipynb", as_version=4)
    assert [c.source for c in saved.cells] == [c.source for c in build().cells]


def test_notebook_executes():
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(DOCS / "walkthrough.ipynb", as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(DOCS)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(str(o.get("data", {}).get("text/plain", "")) for o in outputs)
    assert "Relevance(" in text and "Plan(" in text and "ConceptDepthView(" in text

"""Writes docs/walkthrough.ipynb (the notebook is generated so its source stays reviewable here).
The tests execute it with nbclient (tests/test_notebook.py)."""
from pathlib import Path

import nbformat as nbf

CELLS = [
    ("md", "# lensbench walkthrough on SmolLM2-135M\n\nLoad the bundled model, capture activations, profile "
           "the layers, turn the profile into a plan, explain a prediction with DynamicLRP, and look at the "
           "concept-depth and channel results saved in `reports/`. Every result has a short `repr` and a `.plot()`."),
    ("code", "import lensbench\nfrom lensbench.texts import bbc_news\n\nmodel = lensbench.load('smollm2-135m')\nmodel"),
    ("code", "trace = lensbench.capture(model, ['The capital of France is'])\ntrace['blocks.3.hook_resid_post'].shape"),
    ("md", "## Profile: which layers are redundant"),
    ("code", "profile = lensbench.profile_model(model, bbc_news('calibration', limit=4), analyses=['redundancy'],\n"
             "                                 progress=False)\nprofile"),
    ("code", "profile['block_cosine']"),
    ("code", "profile['block_cosine'].plot()"),
    ("md", "## A plan: drop the two most redundant blocks"),
    ("code", "from lensbench.compress.policies import make_plan\n\nplan = make_plan('drop-block', profile, 2, "
             "ranking='score:block_cosine')\nplan"),
    ("md", "## Relevance: why ' France'?"),
    ("code", "from lensbench.analyses.lrp.attribute import attribute\n\n"
             "rel = attribute(model, 'The city of Lyon is in the country of', target=' France')\nrel"),
    ("code", "rel.plot('tokens')"),
    ("code", "rel.plot('layers')"),
    ("md", "## Saved results: concept depth and channels"),
    ("code", "from pathlib import Path\nfrom lensbench.profiles import Profile\nfrom lensbench.probes.depth import "
             "ConceptDepthView\n\nreports = Path.cwd().parent / 'reports' if Path.cwd().name == 'docs' else "
             "Path('reports')\ndepth = ConceptDepthView(Profile.load(reports / 'concept-depth' / 'smollm2'))\ndepth"),
    ("code", "depth.plot()"),
    ("code", "from lensbench.analyses.channels import ChannelGraph\n\n"
             "channels = ChannelGraph.from_profile(Profile.load(reports / 'channels-smollm2'))\nchannels"),
    ("code", "channels.plot(top=100)"),
]


def build() -> nbf.NotebookNode:
    nb = nbf.v4.new_notebook()
    nb.cells = [nbf.v4.new_markdown_cell(src) if kind == "md" else nbf.v4.new_code_cell(src) for kind, src in CELLS]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


if __name__ == "__main__":
    path = Path(__file__).with_name("walkthrough.ipynb")
    nbf.write(build(), path)
    print(f"wrote {path}")

"""One module per page: PATH, TITLE, layout(state) and register(app, state). Registered in PAGES."""
from . import channels, concept, kv, overview, plans, quant, redundancy, relevance

PAGES = [overview, redundancy, concept, channels, relevance, plans, quant, kv]

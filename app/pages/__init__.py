"""One module per page: PATH, TITLE, layout(state) and register(app, state). Registered in PAGES."""
from . import channels, concept, kv, overview, plans, redundancy, relevance

PAGES = [overview, redundancy, concept, channels, relevance, plans, kv]

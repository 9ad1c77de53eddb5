"""Probe tasks and the layer-wise probe trainer (concept depth). Not built yet: see the concept-depth issue."""

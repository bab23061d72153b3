"""Looking inside and intervening: hook points, traces, interventions, patching, lenses, heads, plots, widgets, corpus-scale routing."""

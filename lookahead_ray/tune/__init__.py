"""Search stage: ``space`` (pure: the trials as dotted overrides) -> ``objective`` (pure: metrics -> score)
-> ``search`` (Ray Tune: each trial = prepare -> train -> eval) -> ``results`` (table, plot, best.yaml).

Import the modules themselves: this package imports nothing, so importing it stays cheap.
"""

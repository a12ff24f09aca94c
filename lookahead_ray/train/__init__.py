"""Train stage: ``deepspeed_config`` (pure) -> ``driver`` (checks, ``build_trainer``, ``run_training``) ->
``loop`` (the per-worker procedure) with ``worker_io`` (Ray or local), ``export`` and ``metrics``.

Import the modules themselves: this package imports nothing, so importing it stays cheap.
"""

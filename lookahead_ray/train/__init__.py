"""Train stage: ``plan`` (everything resolved and checked before Ray starts, and the dry run's engine smoke)
-> ``execute`` (a plan run on a backend: Ray Train workers or this process) -> ``loop`` (the
per-worker procedure, with ``worker_io``, ``data_order``, ``objectives``) -> ``checkpoints`` and ``export``.
``layout`` owns every path inside a run directory; ``deepspeed_config`` and ``cost`` are pure.

Import the modules themselves: this package imports nothing, so importing it stays cheap.
"""

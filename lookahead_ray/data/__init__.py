"""Data stage: records and the pure preview transform, tokenization, readers, and the Ray Data pipeline.

Read in this order: ``records`` -> ``preview`` (pure) -> ``tokenization`` -> ``readers`` -> ``transform`` (one
batch) -> ``datasource`` + ``pipeline`` (Ray Data, ``prepare``); ``preview_file`` is the drop-in ``preview``
command. Import the modules themselves: this package imports nothing, so the pure ones stay cheap.
"""

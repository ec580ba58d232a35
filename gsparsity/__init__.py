"""GSparsity engine: the pieces every top-level script shares.

One job per module: ``structure`` (where the prunable convs are), ``masks`` (which
filters survive, and the compressed model), ``complexity`` (MACs and params),
``registry`` (``list_of_models.py``), ``checkpoint`` (atomic, safe files), ``data``,
``distributed``, ``engine`` (train/validate), ``cli`` and ``runs`` (the workflows).
"""

"""Sparse pattern templates: pure tensor functions from q/k estimates to block scores.

Every template returns scores shaped ``[B, H_q, num_blocks, num_blocks]``, zero above the
block diagonal, each causal row summing to one, so templates can be compared and combined.

- :mod:`sa_compile.templates.strided_query`: sampled real queries against every key (the default).
- :mod:`sa_compile.templates.screened_query`: the same samples against the candidates a pooled
  screen proposes (``SparseConfig.candidates``); scores ``[B, H_q, num_blocks, W]`` over them.
- :mod:`sa_compile.templates.vertical_slash`: column and diagonal mass of the last queries.
- :mod:`sa_compile.templates.block_sparse`: block-pooled queries against block-pooled keys.
- :mod:`sa_compile.templates.block_query`: block-mean queries against every key.
- :mod:`sa_compile.templates.local`: no estimate, the sink and the nearest diagonals.

:mod:`sa_compile.estimates` is the registry: each kind's template, its search FLOPs, and whether calibration may choose it.
"""

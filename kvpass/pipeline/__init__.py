"""The pass, one stage a module, in order: :mod:`~kvpass.pipeline.capture` (export one step over a static cache),
:mod:`~kvpass.pipeline.locate` (find the attention sites and their cache reads and writes),
:mod:`~kvpass.pipeline.plan` (each layer's packed buffers and their bytes), :mod:`~kvpass.pipeline.rewrite` (swap
the buffers and ops; :mod:`~kvpass.pipeline.rope` rebuilds RoPE tables for keys stored before it), and
:mod:`~kvpass.pipeline.build`, which runs them on a captured program."""

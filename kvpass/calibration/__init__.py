"""Calibration: run the model on text and collect what a method's static tensors need.

For every attention layer it records the keys (before RoPE when the method stores them so) and values that
the cache would hold, and their gradients of the language-model loss; from those it fits:

* calibrated per-channel key ranges (``:static`` specs): the ``f/2`` and ``1 - f/2`` quantiles per head and
  channel when ``f`` of the values are kept as outliers, else min and max;
* nuq lookup tables by k-means weighted with the diagonal Fisher information ``(dLoss/dA)**2`` (KVQuant's
  sensitivity-weighted datatype) over the normalised values, and the Q-Norm correction where asked.

The recording runs the captured graph with ``torch.fx.Interpreter``, so it finds keys and values from the graph,
like the pass, not from module names. :class:`Calibration` saves to safetensors + JSON with a hash of the
model's config, checked when loaded into a compile.

The package: :mod:`~kvpass.calibration.record` (run the captured graph and keep keys, values and their Fisher
information), :mod:`~kvpass.calibration.statics` (fit ranges and LUTs), :mod:`~kvpass.calibration.layers` (rank the
layers by measured loss), :mod:`~kvpass.calibration.store` (:class:`Calibration`, saved and checked) and
:mod:`~kvpass.calibration.calibrate` (:func:`calibrate`, all of it in order).
"""

"""What acts on a finished model, whatever trained it: convert static convolutions to dynamic
ones (:mod:`~dynconv.tools.convert`), fold dynamic ones back (:mod:`~dynconv.tools.fold`), count
parameters, MACs, latency and memory (:mod:`~dynconv.tools.cost`, :mod:`~dynconv.tools.counters`,
:mod:`~dynconv.tools.profile`), record attentions (:mod:`~dynconv.tools.inspection`), export to
ONNX (:mod:`~dynconv.tools.export`), load checkpoints (:mod:`~dynconv.tools.checkpoint`) and
write them back in the reference code's layouts (:mod:`~dynconv.tools.official`).

The tools sit above the layers, models and blocks and below the training job: they import
neither :mod:`dynconv.training` nor :mod:`dynconv.cli`.
"""

"""exl2.layers: the layer loop shared by measurement and quantization.

Rows stream through a model one decoder layer at a time (:mod:`.stream`: module specs, embeddings, Hessian
collection), with a checkpoint after each layer (:mod:`.checkpoint`).  It sits above the runtime and the
calibration rows, below every stage that walks the layers.
"""

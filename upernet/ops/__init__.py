"""The numerics of the package, each written once: resizing, the head's concat-conv strategies,
exportable pooling, DCNv3 sampling, scratch memory. Models call these; nothing here knows a model."""

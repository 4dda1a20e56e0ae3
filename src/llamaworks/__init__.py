"""llamaworks: an open, efficient, complete implementation of LLaMA (Touvron et al. 2023)."""

__version__ = "0.1.0"

# Public names resolve lazily so `import llamaworks` stays cheap and side-effect free.
_EXPORTS = {
    "ModelArgs": "llamaworks.model",
    "Transformer": "llamaworks.model",
    "build_model": "llamaworks.model",
    "Tokenizer": "llamaworks.tokenizer",
    "load_model": "llamaworks.inference.load",
    "save_model": "llamaworks.modeldir",
    "generate": "llamaworks.inference.generate",
}


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'llamaworks' has no attribute {name!r}")


__all__ = list(_EXPORTS)

"""odegpt: parameter-shared GPTs that run as ODE solvers at any step size.

Where things are: ``odegpt.model`` (configuration, modeling, solver, cache, cost), ``odegpt.decoding``
(generate: self-speculative and adaptive-depth decoding above the model), ``odegpt.evaluation``
(perplexity, throughput, reports), ``odegpt.training`` (the step-size objective), ``odegpt.folders``
(loading, exporting and importing model folders) and ``odegpt.commands`` (the ``odegpt`` command).

The model's names are importable from here; they load torch and transformers on first use, so that
``odegpt --help`` does not.
"""
from __future__ import annotations

__all__ = ["OdeCache", "OdeGPTConfig", "OdeGPTForCausalLM", "OdeGPTModel"]


def __getattr__(name: str):
    if name in __all__:
        from . import model  # torch and transformers, on first use: `import odegpt` stays light

        return getattr(model, name)
    raise AttributeError(f"module 'odegpt' has no attribute {name!r}")

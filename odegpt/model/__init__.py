"""The model: configuration, modeling, the ODE solver and the KV cache. These files (and only these)
are what a native export copies into its folder, so they import only torch, transformers and each other.

Importing this package registers the model with transformers' Auto classes."""
from transformers import AutoConfig, AutoModelForCausalLM

from .cache import OdeCache
from .configuration_odegpt import OdeGPTConfig
from .modeling_odegpt import OdeGPTForCausalLM, OdeGPTModel

AutoConfig.register(OdeGPTConfig.model_type, OdeGPTConfig, exist_ok=True)
AutoModelForCausalLM.register(OdeGPTConfig, OdeGPTForCausalLM, exist_ok=True)
# Saved folders carry their configuration and modeling code (config.json "auto_map"), so plain
# transformers loads them with trust_remote_code=True where odegpt is not installed.
OdeGPTConfig.register_for_auto_class()
OdeGPTForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["OdeCache", "OdeGPTConfig", "OdeGPTForCausalLM", "OdeGPTModel"]

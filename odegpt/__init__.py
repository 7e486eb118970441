"""odegpt: parameter-shared GPTs that run as ODE solvers at any step size."""
from transformers import AutoConfig, AutoModelForCausalLM

from .cache import OdeCache
from .configuration_odegpt import OdeGPTConfig
from .modeling_odegpt import OdeGPTForCausalLM, OdeGPTModel

AutoConfig.register(OdeGPTConfig.model_type, OdeGPTConfig)
AutoModelForCausalLM.register(OdeGPTConfig, OdeGPTForCausalLM)
# Saved folders carry their configuration and modeling code (config.json "auto_map"), so plain
# transformers loads them with trust_remote_code=True where odegpt is not installed.
OdeGPTConfig.register_for_auto_class()
OdeGPTForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["OdeCache", "OdeGPTConfig", "OdeGPTForCausalLM", "OdeGPTModel"]

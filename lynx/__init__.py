"""The RT-Lynx method, in PyTorch only: layer policies, the Lynx linear, its LoRA and patching."""
from .linear import LowRankBranch, LynxConfig, lynx_linear
from .lora import LynxLoRA, LynxLoRAMismatch, check_fits, load_lynx_lora, save_lynx_lora
from .patching import (LynxLinearForward, LynxPlan, LynxRuntime, attach_lora, installed, module_weights,
                       plan_model, sampling_step_index)
from .policies import (POLICIES, ArchitecturePolicy, LayerDecision, SelectionOptions, detect_architecture,
                       select_layers)
from .version import PACK_VERSION

__all__ = [
    "LowRankBranch", "LynxConfig", "lynx_linear",
    "LynxLoRA", "LynxLoRAMismatch", "check_fits", "load_lynx_lora", "save_lynx_lora",
    "LynxLinearForward", "LynxPlan", "LynxRuntime", "attach_lora", "installed", "module_weights", "plan_model",
    "sampling_step_index",
    "POLICIES", "ArchitecturePolicy", "LayerDecision", "SelectionOptions", "detect_architecture", "select_layers",
    "PACK_VERSION",
]

"""ComfyUI nodes: thin glue from ComfyUI's MODEL to the method in ../lynx."""
from .calibrate import RTLynxCalibrateLoRA
from .lora import RTLynxLoadLoRA
from .sparsify import RTLynxSparsifyModel

NODE_CLASS_MAPPINGS = {
    "RTLynxSparsifyModel": RTLynxSparsifyModel,
    "RTLynxLoadLoRA": RTLynxLoadLoRA,
    "RTLynxCalibrateLoRA": RTLynxCalibrateLoRA,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "RTLynxSparsifyModel": "RT-Lynx Sparsify Model",
    "RTLynxLoadLoRA": "Load Lynx LoRA",
    "RTLynxCalibrateLoRA": "RT-Lynx Calibrate LoRA",
}

"""ComfyUI nodes: thin glue from ComfyUI's MODEL to the method in ../lynx."""
from .calibrate import RTLynxCalibrateLoRA
from .compare import RTLynxCompare
from .compile_model import RTLynxCompileModel
from .lora import RTLynxLoadLoRA
from .sparsify import RTLynxSparsifyModel

NODE_CLASS_MAPPINGS = {
    "RTLynxSparsifyModel": RTLynxSparsifyModel,
    "RTLynxLoadLoRA": RTLynxLoadLoRA,
    "RTLynxCalibrateLoRA": RTLynxCalibrateLoRA,
    "RTLynxCompare": RTLynxCompare,
    "RTLynxCompileModel": RTLynxCompileModel,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "RTLynxSparsifyModel": "RT-Lynx Sparsify Model",
    "RTLynxLoadLoRA": "Load Lynx LoRA",
    "RTLynxCalibrateLoRA": "RT-Lynx Calibrate LoRA",
    "RTLynxCompare": "RT-Lynx Compare",
    "RTLynxCompileModel": "RT-Lynx Compile Model",
}

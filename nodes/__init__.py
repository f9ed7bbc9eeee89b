"""ComfyUI nodes: thin glue from ComfyUI's MODEL to the method in ../lynx."""
from .lora import RTLynxLoadLoRA
from .sparsify import RTLynxSparsifyModel

NODE_CLASS_MAPPINGS = {
    "RTLynxSparsifyModel": RTLynxSparsifyModel,
    "RTLynxLoadLoRA": RTLynxLoadLoRA,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "RTLynxSparsifyModel": "RT-Lynx Sparsify Model",
    "RTLynxLoadLoRA": "Load Lynx LoRA",
}

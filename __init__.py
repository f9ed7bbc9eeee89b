"""RT-Lynx for ComfyUI: online 2:4 activation sparsity on sparse tensor cores for DiTs.

ComfyUI imports this file at start-up, so it stays cheap: the node classes import ComfyUI,
torch kernels and files only when they run.
"""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]

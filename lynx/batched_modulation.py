"""The blocks' modulation linears of an fp8 model as one product per model call.

Every FLUX and Qwen-Image block computes its modulation parameters as linear(silu(vec)) from the
same vec (the timestep and guidance embedding): 76 linears in FLUX.1-dev (3072 -> 18432 or 9216),
120 in Qwen-Image, one input row per image. With fp8 precision each reads its weight in e4m3
(fp8_weight_linear), so each launch is a read of 28-57 MB; launched one by one, every launch
pays its own ramp-up and last partial wave. Here the e4m3 weights of all of them lie side by side
in one tensor, and each layer's own e4m3 weight is a view of its rows (no second copy): the fused
block forwards take each block's parameters as columns of one product of the model call,
computed by the first block that needs it and kept for the others (`modulation_output`). On the
GPU a layer's columns are what its own product gives, byte for byte: the kernel computes each
output channel alone.

The one tensor is used only while every layer's e4m3 weight is still its rows there (`ready`):
layers whose weight is stored in e4m3 (fp8 checkpoints) keep computing from the stored weight,
one launch each, rather than take a second copy of it.
"""
import torch
import torch.nn.functional as F

from ..kernels import linear_fp8_weight


class BatchedModulation:
    """The e4m3 weights, per-channel scales and biases of per-image fp8 forwards (the plan's
    modulation linears, all of one in_features), one row block per layer in plan order. Each
    forward gets `batch` (this) and `batch_columns` (its output columns in the product)."""

    def __init__(self, forwards: list):
        if len({f.module.in_features for f in forwards}) != 1:
            raise ValueError("the layers of one modulation product take one input: one in_features")
        self.forwards = list(forwards)
        self.runtime = self.forwards[0].runtime
        self.backend = self.forwards[0].config.backend
        start = 0
        for forward in self.forwards:
            stop = start + forward.module.out_features
            forward.batch, forward.batch_columns = self, (start, stop)
            start = stop
        self.out_features, self.in_features = start, self.forwards[0].module.in_features
        self.weight: torch.Tensor | None = None   # (out_features, in_features) e4m3
        self.scale: torch.Tensor | None = None    # (out_features,) fp32
        self.bias: torch.Tensor | None = None     # (out_features,) in the compute dtype
        # Set by `write` in eager code: read by compiled calls, which then guard on it.
        self.ready = False

    @staticmethod
    def of(forwards) -> "BatchedModulation | None":
        """One batch of `forwards` where there are two or more of one in_features, else None."""
        forwards = list(forwards)
        if len(forwards) < 2 or len({f.module.in_features for f in forwards}) != 1:
            return None
        return BatchedModulation(forwards)

    def write(self, device: torch.device, dtype: torch.dtype, prepare) -> bool:
        """Make the one tensor on `device` (or keep it, where it is there: a model replaying CUDA graphs
        reads it where they were recorded), point each layer's e4m3 weight at its rows, and let
        `prepare(forward)` write each layer's weight there (prepare_fp8 with keep_addresses); then the
        biases, in `dtype`. Returns `ready`."""
        self.ready = False
        if not self.holds_tensor_on(device):
            # The layers' own copies go first: with the new tensor beside them the peak would be two copies.
            for forward in self.forwards:
                forward.release_fp8()
            self.release()
            device = _indexed(device)
            self.weight = torch.empty(self.out_features, self.in_features, dtype=torch.float8_e4m3fn, device=device)
            self.scale = torch.empty(self.out_features, dtype=torch.float32, device=device)
        for forward in self.forwards:
            start, stop = forward.batch_columns
            forward.write_fp8_into(self.weight[start:stop], self.scale[start:stop])
        try:
            for forward in self.forwards:
                prepare(forward)
        except BaseException:   # rows half written: no layer may compute from them
            for forward in self.forwards:
                forward.release_fp8()
            self.release()
            raise
        if self.bias is None or self.bias.device != self.weight.device or self.bias.dtype != dtype:
            self.bias = torch.empty(self.out_features, dtype=dtype, device=self.weight.device)
        with torch.no_grad():
            for forward in self.forwards:
                start, stop = forward.batch_columns
                bias = forward.fp8_bias if forward.fp8_bias is not None else forward.module.bias
                if bias is None:
                    self.bias[start:stop].zero_()
                else:
                    self.bias[start:stop].copy_(bias.detach())
        self.ready = all(self._holds_rows_of(forward) for forward in self.forwards)
        return self.ready

    def holds_tensor_on(self, device: torch.device) -> bool:
        """Whether the one tensor exists on `device` (a write there makes no new one)."""
        return self.weight is not None and self.weight.device == _indexed(device)

    def _holds_rows_of(self, forward) -> bool:
        start, _ = forward.batch_columns
        return (forward.fp8_weight is not None and forward.fp8_weight[0].data_ptr() == self.weight[start].data_ptr()
                and forward.fp8_weight[1].data_ptr() == self.scale[start:].data_ptr())

    def release(self) -> None:
        self.weight = self.scale = self.bias = None
        self.ready = False

    def product(self, vec: torch.Tensor) -> torch.Tensor:
        """silu(vec) times every layer's weight, (images, out_features), vec (images, in_features)."""
        if self.runtime.before_each_call is not None:
            self.runtime.before_each_call()
        x = F.silu(vec)
        bias = self.bias if self.bias.dtype == x.dtype else self.bias.to(x.dtype)
        return linear_fp8_weight(x, self.weight, self.scale, bias, self.backend)


def _indexed(device) -> torch.device:
    # "cuda" without an index is the current GPU, as the tensors made there report it.
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def modulation_output(layer, vec: torch.Tensor) -> torch.Tensor | None:
    """layer's linear of silu(vec), (images, out_features), `layer` the Lynx forward installed on a
    block's modulation linear (patching.lynx_layer), as its columns of the model call's one
    modulation product: made here by the call's first block and kept in the layers' runtime for
    the others (`LynxRuntime.modulation_product`, which the host clears around each call). None
    where the layer is in no ready batch: the caller computes it as the block does. The product is
    kept with its vec and taken only for that vec, so one left from another call is never read.

    A per-call field of the runtime, not the call's transformer_options: compiled, a dict the call
    receives and the model writes into is guarded on all its values, and the sampler's schedule
    there changes with the step count."""
    columns = None if layer is None else layer.batch_columns
    if columns is None or vec.dim() != 2:
        return None
    runtime = layer.runtime
    held = runtime.modulation_product
    if held is None or held[0] is not vec:
        batch = layer.batch
        if not batch.ready or batch.weight.device != vec.device or runtime.dense:
            return None
        held = (vec, batch.product(vec))
        runtime.modulation_product = held
    return held[1][:, columns[0]:columns[1]]

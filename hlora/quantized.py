"""H-LoRA on quantized frozen bases (QLoRA-style): bitsandbytes ``Linear4bit`` (nf4 / fp4, double
quant), ``Linear8bitLt``, and ``nn.Linear`` layers whose weight torchao has quantized.

The base module's own forward computes the base product (dequantizing however its library does);
the adapter is ``hlora.functional.hlora_linear`` with the module as a callable base, so on CUDA the
kernels accumulate the adapter into the base's output (the ``cublas`` strategy; the fused
extended-K GEMM reads dense weights only) and elsewhere the torch reference adds it::

    y = base(x_c) + sum_p [token routed to p] * B_p (dropout(s_p A_p x_c) * repeat_interleave(g_p, r_p))
    x_c = x in the base's compute dtype,  g_p = softmax(router_p x_c)

``compute_dtype(base, x)``: a 4-bit layer's ``compute_dtype`` (x's dtype when it has none), x's dtype
for 8-bit (bitsandbytes computes in it), the dequantized weight's dtype for torchao. The plugins keep
their own dtype (float32 by default, like PEFT's QLoRA adapters): they are rounded to the compute
dtype inside the op and their gradients come back in their own dtype. y is returned in x's dtype, as
the base modules do.

Only the adapter is hlora's: ``hlora.save`` writes the plugins, never the quantized base, and
``merge`` is refused (a 4-bit / 8-bit weight cannot absorb a float update without requantizing
it, which would change the base for every other plugin). The layer keeps the base module's
state-dict keys (the quantization statistics included), as ``AdapterLayer`` does for dense bases.

bitsandbytes and torchao stay optional: layers are recognised by looking their classes up in
``sys.modules`` (a model holding such a layer has imported its library already).
"""

from __future__ import annotations

import sys

import torch
import torch.nn as nn

from .layer import HLoRALinear

__all__ = [
    "QuantizedHLoRALinear",
    "quantization_kind",
    "is_quantized_linear",
    "compute_dtype",
    "nf4_weight_bytes",
    "quantize_4bit",
]

PLUGIN_DTYPE = torch.float32


def _bnb_class(name: str):
    module = sys.modules.get("bitsandbytes.nn.modules")
    return getattr(module, name, None)


def quantization_kind(module: nn.Module) -> str | None:
    """``"bnb_4bit"``, ``"bnb_8bit"``, ``"torchao"`` for a quantized linear hlora adapts, else None."""
    for kind, cls_name in (("bnb_4bit", "Linear4bit"), ("bnb_8bit", "Linear8bitLt")):
        cls = _bnb_class(cls_name)
        if cls is not None and isinstance(module, cls):
            return kind
    weight = getattr(module, "weight", None)
    if (
        isinstance(module, nn.Linear)
        and type(module).forward is nn.Linear.forward
        and type(weight).__module__.split(".")[0] == "torchao"
    ):
        return "torchao"
    return None


def is_quantized_linear(module: nn.Module) -> bool:
    return quantization_kind(module) is not None


def compute_dtype(base: nn.Module, x: torch.Tensor) -> torch.dtype:
    """The dtype ``base`` computes its product in for input ``x`` (module docstring)."""
    kind = quantization_kind(base)
    if kind == "bnb_4bit":
        return base.compute_dtype or x.dtype
    if kind == "torchao":
        return base.weight.dtype
    return x.dtype


def nf4_weight_bytes(numel: int, blocksize: int = 64, double_quant: bool = True, nested_blocksize: int = 256) -> float:
    """Bytes bitsandbytes holds for a [d_out, d_in] weight of ``numel`` values in nf4 / fp4: two
    values per byte, plus one absmax per ``blocksize`` values: float32, or with double quantization
    one uint8 code per block plus a float32 absmax per ``nested_blocksize`` blocks and a float32
    offset. (The 16-entry code table, 64 bytes per layer, is left out.)"""
    blocks = -(-numel // blocksize)
    if double_quant:
        absmax = blocks + 4 * -(-blocks // nested_blocksize) + 4
    else:
        absmax = 4 * blocks
    return numel / 2 + absmax


@torch.no_grad()
def quantize_4bit(model: nn.Module, compute_dtype: torch.dtype, *, skip=(), quant_type: str = "nf4",
                  double_quant: bool = True) -> list:
    """Replace every plain ``nn.Linear`` of ``model`` (paths in ``skip``, e.g. the output head, and
    their submodules excepted) by a bitsandbytes ``Linear4bit`` holding its weight quantized where the
    weight lives (bitsandbytes' CPU backend on a CPU; a later ``.to("cuda")`` moves the quantized
    weight and its statistics), with the bias kept dense. The same layers transformers'
    ``BitsAndBytesConfig(load_in_4bit=True, ...)`` builds, for models built in code. Returns the paths."""
    import bitsandbytes as bnb  # optional dependency ([quant]): only for models quantized here

    skip = tuple(skip)
    done = []
    for path, module in list(model.named_modules()):
        if type(module) is not nn.Linear or any(path == s or path.startswith(s + ".") for s in skip):
            continue
        q = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                              compute_dtype=compute_dtype, compress_statistics=double_quant, quant_type=quant_type,
                              device="meta")
        q.weight = bnb.nn.Params4bit(module.weight.data, requires_grad=False, compress_statistics=double_quant,
                                     quant_type=quant_type)
        if module.bias is not None:
            q.bias = nn.Parameter(module.bias.data, requires_grad=False)
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, q.to(module.weight.device))  # quantizes
        done.append(path)
    return done


class QuantizedHLoRALinear(HLoRALinear):
    """``HLoRALinear`` on a quantized base module (module docstring: formula, dtypes, contract)."""

    def __init__(self, base: nn.Module, plugins: dict, plugin_names: list):
        if quantization_kind(base) is None:
            raise TypeError(f"{type(base).__name__} is not a quantized linear hlora.quantized recognises")
        super().__init__(base, plugins, plugin_names)
        # a 4-bit weight is stored packed: the layer's geometry is the module's, not the weight's shape
        self.in_features, self.out_features = int(base.in_features), int(base.out_features)
        if getattr(base, "support_avx512bf16_for_cpu", False):
            # bitsandbytes >= 0.50 on an AVX512-BF16 CPU repacks a 4-bit weight in place on its first
            # eval forward (seen with 0.50.2): the saved quant state then differs from the loaded one
            # (absmax re-quantized), the output from the dense model with the dequantized weight, and
            # a layer narrower than a quantization block fails. The adapter keeps the base as loaded.
            base.support_avx512bf16_for_cpu = False

    @property
    def quantization(self) -> str:
        return quantization_kind(self.base_layer)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, base={self.quantization}"

    def add_plugin(self, name, cfg) -> None:
        if name not in self.plugin_names:
            self.plugin_names.append(name)
        base = self.base_layer
        self.plugins[name] = self.plugin_cls(
            cfg, base.in_features, base.out_features, device=self.weight.device, dtype=PLUGIN_DTYPE
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        names, token_plugin = self._route(x)
        if not names:
            return self.base_layer(x)
        return self.adapted_forward(x, names, token_plugin)

    def adapted_forward(self, x, names, token_plugin):
        y = self.mixture(x.to(compute_dtype(self.base_layer, x)), self.base_layer, None, names, token_plugin)
        return y.to(x.dtype)

    @property
    def base_weight(self) -> torch.Tensor:
        raise TypeError(
            f"the base of this layer is a {self.quantization} quantized {type(self.base_layer).__name__}: "
            "it has no dense weight; its own forward computes the base product"
        )

    def merge(self, name: str) -> None:
        raise RuntimeError(
            f"cannot merge plugin {name!r}: the base weight is {self.quantization}-quantized "
            f"({type(self.base_layer).__name__}), and folding a float update into it would requantize the "
            "base every other plugin shares; keep the plugin unmerged, or merge into a dense (dequantized) copy"
        )

    # the base module's own state-dict entries (4-bit absmax/quant_map/quant_state, 8-bit SCB, ...),
    # under the same keys as before injection
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self.base_layer._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self.base_layer._load_from_state_dict(state_dict, prefix, *args, **kwargs)


QUANTIZED_LAYER_CLASSES = {"hlora": QuantizedHLoRALinear}


def quantized_layer_class(base: nn.Module, variant: str):
    """The adapter layer class for ``base`` if it is a quantized linear (an error for variants that
    have no quantized layer), else None."""
    if quantization_kind(base) is None:
        return None
    if variant not in QUANTIZED_LAYER_CLASSES:
        raise ValueError(
            f"variant {variant!r} has no quantized-base layer ({type(base).__name__}); "
            f"quantized bases take the variants {sorted(QUANTIZED_LAYER_CLASSES)}"
        )
    return QUANTIZED_LAYER_CLASSES[variant]

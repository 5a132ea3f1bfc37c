"""``HealthGPTConfig``: what a HealthGPT model is made of, with the ``m3``, ``l14`` and ``tiny`` presets.

A config names local directories for the pretrained parts (nothing is downloaded) or, where a
path is ``None``, the architecture to build with random weights. Every field a preset fixes can be
overridden: ``HealthGPTConfig.preset("m3", llm_path="/models/Phi-3-mini-4k-instruct")``.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import asdict, dataclass, field, fields

from healthgpt.constants import TASKS

__all__ = ["HealthGPTConfig", "MODEL_PRESETS", "CONFIG_NAME", "llm_weight_bytes"]

CONFIG_NAME = "healthgpt_config.json"


def llm_weight_bytes(llm_config: dict, load_in_4bit: bool, vocab_size: int | None = None) -> dict:
    """Bytes of a Phi-3-architecture LLM's weights in 16-bit, or with its decoder linears in nf4 with
    double quantization (``load_in_4bit``; ``hlora.quantized.nf4_weight_bytes``): ``{"linear", "other",
    "total"}``. ``other`` (embeddings, ``lm_head``, norms) stays 16-bit either way; ``vocab_size``
    defaults to the config's (HealthGPT adds 8195 generation tokens to the tokenizer's)."""
    from hlora.quantized import nf4_weight_bytes  # local: the config module imports nothing heavy

    c = llm_config
    hidden, inter, layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    head_dim = c.get("head_dim") or hidden // c["num_attention_heads"]
    kv = c.get("num_key_value_heads") or c["num_attention_heads"]
    shapes = [(hidden + 2 * kv * head_dim, hidden), (hidden, hidden), (2 * inter, hidden), (hidden, inter)]
    per_layer = [o * i for o, i in shapes]  # qkv_proj, o_proj, gate_up_proj, down_proj
    linear = layers * sum(nf4_weight_bytes(n) if load_in_4bit else 2 * n for n in per_layer)
    vocab = vocab_size or c["vocab_size"]
    other = 2 * (2 * vocab * hidden + (2 * layers + 1) * hidden)  # embed_tokens + lm_head, 2 norms per layer + final
    return {"linear": linear, "other": other, "total": linear + other}


# ---- architectures (used when the matching *_path is None: random weights) ----------------------

CLIP_VIT_L14_336 = dict(  # openai/clip-vit-large-patch14-336, vision half
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
    image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5,
)
PHI3_MINI_4K = dict(  # microsoft/Phi-3-mini-4k-instruct
    vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
    original_max_position_embeddings=4096, rms_norm_eps=1e-5, sliding_window=2047,
    bos_token_id=1, eos_token_id=32000, pad_token_id=32000, tie_word_embeddings=False,
)
PHI4 = dict(  # microsoft/phi-4 (loads as Phi3ForCausalLM); token ids come from its tokenizer
    vocab_size=100352, hidden_size=5120, intermediate_size=17920, num_hidden_layers=40,
    num_attention_heads=40, num_key_value_heads=10, max_position_embeddings=16384,
    original_max_position_embeddings=16384, rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 250000.0},
    tie_word_embeddings=False,
)
VQGAN_OPENIMAGES_F8_8192 = dict(  # taming "VQGAN OpenImages f=8, 8192, Gumbel" as diffusers.VQModel
    block_out_channels=(128, 128, 256, 512), layers_per_block=2, latent_channels=256,
    num_vq_embeddings=8192, vq_embed_dim=256, norm_num_groups=32, resolution=256, attn_resolutions=(32,),
)

TINY_CLIP = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
    image_size=56, patch_size=14, projection_dim=32, hidden_act="quick_gelu",
)
TINY_PHI3 = dict(
    vocab_size=32011, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=2048, bos_token_id=1, eos_token_id=32000,
    pad_token_id=32000, tie_word_embeddings=False,
)
TINY_VQ = dict(
    block_out_channels=(8, 8, 16, 16), layers_per_block=1, latent_channels=8, num_vq_embeddings=8192,
    vq_embed_dim=8, norm_num_groups=4, resolution=256, attn_resolutions=(32,),
)


def _plugins(comp_rank: int, gen_rank: int, experts: int = 4, scale: float = 8.0, dropout: float = 0.05) -> dict:
    """Plugin configs with ``alpha = scale * rank / experts`` (the released s = alpha / r = 8)."""
    return {
        "comp": dict(rank=comp_rank, num_experts=experts, alpha=scale * comp_rank / experts, dropout=dropout),
        "gen": dict(rank=gen_rank, num_experts=experts, alpha=scale * gen_rank / experts, dropout=dropout),
    }


class JsonConfig:
    """Strict JSON round trip for a config dataclass: ``from_dict`` refuses unknown fields (a typo in a
    saved config fails loudly), ``to_dict`` gives what a JSON round trip gives (tuples become lists)."""

    @classmethod
    def from_dict(cls, data: dict):
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields {sorted(unknown)}")
        return cls(**data)

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))


@dataclass
class HealthGPTConfig(JsonConfig):
    """Everything needed to build a HealthGPT model.

    Attributes:
        template: chat template, ``"phi3"`` or ``"phi4"`` (``healthgpt.model.templates.TEMPLATES``).
        system_prompt: overrides the template's system message when not ``None``.
        llm_path: local directory of a Phi3ForCausalLM checkpoint (Phi-3-mini or phi-4);
            ``None`` builds ``llm_config`` with random weights.
        llm_config: ``transformers.Phi3Config`` fields, used only when ``llm_path`` is ``None``.
        vision_path: local directory of a CLIP checkpoint (full CLIP or vision-only);
            ``None`` builds ``vision_config`` with random weights.
        vision_config: ``transformers.CLIPVisionConfig`` fields, used only when ``vision_path`` is ``None``.
        tokenizer_path: local tokenizer directory; ``None`` means ``llm_path``; both ``None``: the LLaMA-2
            32k BPE (Phi-3's base vocabulary) from the ``wordllama`` wheel plus Phi-3's special tokens.
        image_tokenizer_path: directory written by ``VQTokenizer.save_pretrained`` (e.g. by
            ``healthgpt convert-vqgan``); ``None`` builds ``image_tokenizer_config`` with random weights.
        image_tokenizer_config: ``healthgpt.model.vq.VQConfig`` fields, used only when the path is ``None``.
        plugins: task -> ``hlora.PluginConfig`` fields, for ``comp`` and ``gen``.
        visual_layers: task -> CLIP hidden state the task reads (``-2`` abstract, ``1`` concrete).
        dtype: torch dtype name of the LLM, vision tower and projectors (the image tokenizer stays float32).
        attn_implementation: ``None`` picks flash_attention_2 when flash-attn is installed, CUDA is
            available and ``dtype`` is 16-bit, else ``"sdpa"``.
        load_in_4bit: hold the LLM's linear layers (all but ``lm_head``) in bitsandbytes nf4 with double
            quantization, computing in ``dtype`` (QLoRA); the vision tower, projectors, embeddings and
            ``lm_head`` stay in ``dtype``. Needs ``hlora[quant]``. ``llm_weight_bytes`` gives the saving.
    """

    template: str = "phi3"
    system_prompt: str | None = None
    llm_path: str | None = None
    llm_config: dict | None = None
    vision_path: str | None = None
    vision_config: dict | None = None
    tokenizer_path: str | None = None
    image_tokenizer_path: str | None = None
    image_tokenizer_config: dict | None = None
    plugins: dict = field(default_factory=lambda: _plugins(64, 256))
    visual_layers: dict = field(default_factory=lambda: {"comp": -2, "gen": 1})
    dtype: str = "float32"
    attn_implementation: str | None = None
    load_in_4bit: bool = False

    def __post_init__(self):
        from healthgpt.model.templates import TEMPLATES  # local: templates imports nothing from here at import time

        if self.template not in TEMPLATES:
            raise ValueError(f"template must be one of {sorted(TEMPLATES)}, got {self.template!r}")
        for name in ("plugins", "visual_layers"):
            value = getattr(self, name)
            if set(value) != set(TASKS):
                raise ValueError(f"{name} must have exactly the tasks {TASKS} as keys, got {sorted(value)}")
        for task, layer in self.visual_layers.items():
            if int(layer) != layer:
                raise ValueError(f"visual_layers[{task!r}] must be an int hidden-state index, got {layer!r}")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {self.dtype!r}")
        for name in ("llm", "vision"):
            if getattr(self, f"{name}_path") is None and getattr(self, f"{name}_config") is None:
                raise ValueError(f"{name}_path and {name}_config are both None: give a checkpoint directory or an architecture")
        if self.image_tokenizer_path is None and self.image_tokenizer_config is None:
            raise ValueError("image_tokenizer_path and image_tokenizer_config are both None")

    # ---- presets ----------------------------------------------------------------------------------

    @classmethod
    def preset(cls, name: str, **overrides) -> "HealthGPTConfig":
        """``m3`` (CLIP ViT-L/14-336 + Phi-3-mini), ``l14`` (+ phi-4) or ``tiny``, with ``overrides``."""
        if name not in MODEL_PRESETS:
            raise ValueError(f"unknown preset {name!r}; presets: {sorted(MODEL_PRESETS)}")
        unknown = set(overrides) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown HealthGPTConfig fields {sorted(unknown)}")
        data = copy.deepcopy(MODEL_PRESETS[name])
        data.update(overrides)
        return cls(**data)

    # ---- serialisation ----------------------------------------------------------------------------

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "HealthGPTConfig":
        path = os.path.join(directory, CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"no {CONFIG_NAME} in {directory!s}: not a HealthGPT weights directory (see HealthGPT.save_pretrained)"
            )
        with open(path) as f:
            return cls.from_dict(json.load(f))


MODEL_PRESETS = {
    "m3": dict(
        template="phi3", llm_config=PHI3_MINI_4K, vision_config=CLIP_VIT_L14_336,
        image_tokenizer_config=VQGAN_OPENIMAGES_F8_8192, plugins=_plugins(64, 256), dtype="bfloat16",
    ),
    "l14": dict(
        template="phi4", llm_config=PHI4, vision_config=CLIP_VIT_L14_336,
        image_tokenizer_config=VQGAN_OPENIMAGES_F8_8192, plugins=_plugins(32, 128), dtype="bfloat16",
    ),
    "tiny": dict(
        template="phi3", llm_config=TINY_PHI3, vision_config=TINY_CLIP, image_tokenizer_config=TINY_VQ,
        plugins=_plugins(8, 16), dtype="float32",
    ),
}
"""Model architecture presets (``--model-preset``): name -> ``HealthGPTConfig`` fields. The training
hyperparameters of the same names are ``healthgpt.training.presets.STAGE_HPARAMS``. Real presets have no paths: set ``llm_path``,
``vision_path`` and ``image_tokenizer_path`` to local checkpoints (random weights otherwise)."""

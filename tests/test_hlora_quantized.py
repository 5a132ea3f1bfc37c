"""H-LoRA on quantized bases with the real bitsandbytes (CPU backend here, CUDA when a GPU runs this
file through benchmarks/gpu_check.sh) and torchao: the layer against an independent float64
expert-by-expert reference on the dequantized weight, gradients, routing, the transformers
BitsAndBytesConfig path on tiny Llama / Phi-3, save/load, merge refused, and PEFT QLoRA import."""

import importlib
import os
import sys

import torch

if not torch.cuda.is_available():  # the kernels' path runs in the Triton interpreter here (as in test_kernels.py)
    os.environ["TRITON_INTERPRET"] = "1"
    _loaded = sys.modules.get("hlora.kernels.fused_linear")
    if _loaded is not None and not _loaded.INTERPRET:
        importlib.reload(_loaded)

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
import pytest
import torch.nn as nn
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from torchao.quantization import Int8WeightOnlyConfig, quantize_
from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM

import hlora
from hlora.quantized import QuantizedHLoRALinear, nf4_weight_bytes, quantization_kind

pytestmark = pytest.mark.usefixtures("one_thread")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
D_IN, D_OUT = 45, 29  # odd: 4-bit blocks straddle rows
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


# ---- helpers --------------------------------------------------------------------------------------


def _quantized_linear(kind: str, dense: nn.Linear, device: str) -> nn.Module:
    if kind == "torchao":
        q = nn.Linear(dense.in_features, dense.out_features).to(device=device, dtype=torch.bfloat16)
        q.load_state_dict(dense.state_dict())
        quantize_(q, Int8WeightOnlyConfig())
        return q
    if kind == "bnb_8bit":
        q = bnb.nn.Linear8bitLt(dense.in_features, dense.out_features, has_fp16_weights=False)
    else:
        quant_type, double_quant, dtype = {
            "nf4_double_fp32": ("nf4", True, torch.float32),
            "fp4_bf16": ("fp4", False, torch.bfloat16),
        }[kind]
        q = bnb.nn.Linear4bit(dense.in_features, dense.out_features, compute_dtype=dtype,
                              quant_type=quant_type, compress_statistics=double_quant)
    q.load_state_dict(dense.state_dict())
    return q.to(device)  # quantizes


def _dequantized(q: nn.Module) -> torch.Tensor:
    """The base weight [d_out, d_in] as the quantized module stores it, in float64."""
    kind = quantization_kind(q)
    if kind == "bnb_4bit":
        return bnbF.dequantize_4bit(q.weight.data, q.weight.quant_state).double()
    if kind == "bnb_8bit":
        scb = q.weight.SCB if q.weight.SCB is not None else q.state.SCB  # the first forward moves it to state
        return bnbF.int8_vectorwise_dequant(q.weight.data, scb).double()
    return q.weight.dequantize().double()


def _randomize(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in hlora.adapter_layers(model):
            for p in layer.plugins.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _reference_delta(x64, plugins, token_plugin, d_out):
    """float64, expert by expert: sum_p [token in p] * s_p * sum_i g_i B_i A_i x, for ``plugins`` a
    list of (A, B, router, k, scale)."""
    out = torch.zeros(x64.shape[0], d_out, dtype=torch.float64, device=x64.device)
    for p_idx, (A, B, router, k, scale) in enumerate(plugins):
        g = torch.softmax(x64 @ router.t(), dim=-1)
        r = A.shape[0] // k
        d = sum(g[:, i : i + 1] * ((x64 @ A[i * r : (i + 1) * r].t()) @ B[:, i * r : (i + 1) * r].t()) for i in range(k))
        out = out + scale * d * (token_plugin == p_idx).unsqueeze(-1).double()
    return out


# ---- one layer against float64 --------------------------------------------------------------------


LAYER_CASES = [  # (kind, device, backend): "auto" is the kernels on CUDA, the torch reference on a CPU
    *[(kind, "cpu", "auto") for kind in ("nf4_double_fp32", "fp4_bf16", "bnb_8bit", "torchao")],
    ("nf4_double_fp32", "cpu", "triton"),  # the kernels' callable-base path, in the interpreter
    ("bnb_8bit", "cpu", "triton"),
    *[(kind, "cuda", "auto") for kind in ("nf4_double_fp32", "fp4_bf16", "bnb_8bit") if "cuda" in DEVICES],
]


@pytest.mark.parametrize("kind, device, backend", LAYER_CASES)
def test_layer_equals_quantized_base_plus_float64_formula(kind, device, backend, monkeypatch):
    monkeypatch.setenv("HLORA_BACKEND", backend)
    monkeypatch.setenv("HLORA_KERNELS_POISON", "1")  # kernel outputs start as NaN: an unwritten element fails
    torch.manual_seed(0)
    q = _quantized_linear(kind, nn.Linear(D_IN, D_OUT), device)
    model = nn.Sequential(q)
    keys_before = set(model.state_dict())
    hlora.inject(model, hlora.HLoRAConfig(plugins={"a": hlora.PluginConfig(8, 4, 16), "b": hlora.PluginConfig(6, 2, 3)}))
    layer = model[0]
    assert isinstance(layer, QuantizedHLoRALinear) and layer.base_layer is q
    # the base's own keys (quantization statistics included) are unchanged; the plugins are added
    assert set(model.state_dict()) == keys_before | {f"0.plugins.{n}.{w}" for n in "ab" for w in ("A", "B", "router")}
    assert all(p.dtype == torch.float32 for p in layer.plugins.parameters())  # plugins keep their own dtype
    _randomize(model)
    token_plugin = torch.tensor([0, 1, -1, 1, 0, 0, 1], device=device)
    hlora.set_task(model, token_plugin)  # one token per sample: per-sample routing, -1 = base only
    compute = {"fp4_bf16": torch.bfloat16, "torchao": torch.bfloat16}.get(kind, torch.float32)
    x = torch.randn(7, 1, D_IN, device=device, requires_grad=True)
    x_in = x.to(torch.bfloat16) if kind == "torchao" else x  # torchao's linear takes its weight's dtype
    y = model(x_in)
    assert y.dtype == x_in.dtype and not y.isnan().any()
    y2 = y.reshape(7, D_OUT)

    x64 = x.detach().reshape(7, D_IN).to(compute).double()  # the input the base computes on
    with torch.no_grad():
        base_out = q(x.detach().reshape(7, D_IN).to(compute)).double()
    plugin_params = [getattr(layer.plugins[n], w) for n in "ab" for w in ("A", "B", "router")]
    leaves = [p.detach().double().requires_grad_(True) for p in plugin_params]
    x_leaf = x64.clone().requires_grad_(True)
    specs = [(*leaves[3 * i : 3 * i + 3], layer.plugins[n].num_experts, layer.plugins[n].scale) for i, n in enumerate("ab")]
    delta = _reference_delta(x_leaf, specs, token_plugin, D_OUT)
    tol = TOL[compute]
    # the layer is the base module's own output plus the formula
    torch.testing.assert_close(y2.double(), base_out + delta.detach(), rtol=tol, atol=tol)
    assert torch.equal(y2[2].double(), base_out[2])  # the token routed to no plugin: exactly the base
    # and the base module computes the product of its dequantized weight (8-bit on CUDA quantizes x too)
    W, b = _dequantized(q), q.bias.double()
    base_tol = 3e-2 if (kind == "bnb_8bit" and device == "cuda") else tol
    torch.testing.assert_close(base_out, x64 @ W.t() + b, rtol=base_tol, atol=base_tol * 4)

    dy = torch.randn(7, D_OUT, dtype=torch.float64, device=device)
    y2.backward(dy.to(y2.dtype))
    ref_grads = torch.autograd.grad(x_leaf @ W.t() + b + delta, [x_leaf, *leaves], dy)
    for p, want in zip(plugin_params, ref_grads[1:]):
        assert p.grad is not None and p.grad.dtype == p.dtype
        torch.testing.assert_close(p.grad.double(), want, rtol=tol * 5, atol=tol * 5)
    torch.testing.assert_close(x.grad.reshape(7, D_IN).double(), ref_grads[0], rtol=base_tol * 5, atol=base_tol * 5)
    assert all(p.grad is None for n, p in model.named_parameters() if ".plugins." not in n)


# ---- tiny transformers models quantized by transformers' BitsAndBytesConfig -------------------------

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
ARCHS = {"llama": (LlamaConfig, LlamaForCausalLM), "phi3": (Phi3Config, Phi3ForCausalLM)}
NF4 = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
           bnb_4bit_compute_dtype=torch.float32)


@pytest.fixture(scope="module")
def saved_dense(tmp_path_factory):
    """arch -> a directory holding a seeded tiny random model (float32) in transformers' format."""
    dirs = {}
    for arch, (config_cls, model_cls) in ARCHS.items():
        torch.manual_seed(0)
        extra = {"pad_token_id": 0} if arch == "phi3" else {}
        dirs[arch] = str(tmp_path_factory.mktemp(arch))
        model_cls(config_cls(**TINY, **extra)).save_pretrained(dirs[arch])
    return dirs


def _load_quantized(saved_dense, arch, **bnb_kwargs):
    model_cls = ARCHS[arch][1]
    model = model_cls.from_pretrained(saved_dense[arch], quantization_config=BitsAndBytesConfig(**bnb_kwargs),
                                      device_map="cpu").eval()
    for m in model.modules():  # the reference paths (PEFT's, the bare model) keep the weight layout as loaded,
        if hasattr(m, "support_avx512bf16_for_cpu"):  # as hlora's adapted layers do (QuantizedHLoRALinear):
            m.support_avx512bf16_for_cpu = False  # bitsandbytes' AVX512-BF16 repack fails on these tiny shapes
    return model


def _ids(batch=3, seq=5, seed=0):
    return torch.randint(0, 97, (batch, seq), generator=torch.Generator().manual_seed(seed))


TWO_PLUGINS = dict(plugins={"comp": hlora.PluginConfig(8, 4, 16), "gen": hlora.PluginConfig(16, 4, 32)})


@pytest.mark.parametrize("arch, bits", [("llama", 4), ("phi3", 4), ("phi3", 8)])
def test_all_linear_adapts_the_quantized_linears_and_trains_only_plugins(saved_dense, arch, bits):
    model = _load_quantized(saved_dense, arch, **(NF4 if bits == 4 else dict(load_in_8bit=True)))
    quantized = {n for n, m in model.named_modules() if quantization_kind(m) is not None}
    assert quantized and "lm_head" not in quantized  # transformers keeps the head dense
    frozen = {n: t.clone() for n, t in model.state_dict().items()}
    hlora.inject(model, hlora.HLoRAConfig(**TWO_PLUGINS, target_modules="all-linear"))
    adapted = {n for n, _ in hlora.named_adapter_layers(model)}
    assert adapted == quantized
    assert all(isinstance(m, QuantizedHLoRALinear) for m in hlora.adapter_layers(model))
    _randomize(model)
    hlora.set_task(model, ["comp", "gen", "comp"])
    model.train()
    out = model(input_ids=_ids(), labels=_ids())
    assert torch.isfinite(out.loss)
    out.loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, p in model.named_parameters() if ".plugins." in n}
    assert all(model.get_parameter(n).grad.abs().sum() > 0 for n in with_grad if n.endswith(".A"))
    state = model.state_dict()
    for n, t in frozen.items():  # the quantized base (and its statistics) is untouched, same keys
        assert torch.equal(state[n], t), n


def test_adapted_4bit_layers_keep_the_base_as_loaded_and_follow_train_eval(saved_dense):
    """bitsandbytes >= 0.50 repacks a 4-bit weight in place on the first eval forward on a CPU with
    AVX512-BF16 (changing its saved quant state, failing on small layers): an adapted layer turns
    that off, and passes train() / eval() on to its base (which sits outside the module tree)."""
    model = ARCHS["llama"][1].from_pretrained(saved_dense["llama"], quantization_config=BitsAndBytesConfig(**NF4),
                                              device_map="cpu")
    bases = [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    assert bases
    for m in bases:
        m.support_avx512bf16_for_cpu = True  # as bitsandbytes sets it on such a CPU
    frozen = {n: t.clone() for n, t in model.state_dict().items()}
    hlora.inject(model, hlora.HLoRAConfig(**TWO_PLUGINS, target_modules="all-linear"))
    assert not any(m.support_avx512bf16_for_cpu for m in bases)
    model.train()
    assert all(m.training for m in bases)
    model.eval()
    assert not any(m.training for m in bases)
    hlora.set_task(model, "comp")
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=_ids()).logits).all()
    state = model.state_dict()
    assert all(torch.equal(state[n], t) for n, t in frozen.items())


def test_per_sample_routing_matches_one_task_batches(saved_dense):
    model = _load_quantized(saved_dense, "llama", **NF4)
    hlora.inject(model, hlora.HLoRAConfig(**TWO_PLUGINS))
    _randomize(model)
    ids = _ids(batch=3)
    with torch.no_grad():
        hlora.set_task(model, ["gen", None, "comp"])
        mixed = model(input_ids=ids).logits
        for row, t in enumerate(["gen", None, "comp"]):
            hlora.set_task(model, t)
            alone = model(input_ids=ids[row : row + 1]).logits
            torch.testing.assert_close(mixed[row : row + 1], alone, rtol=1e-5, atol=1e-5)
        hlora.set_task(model, "gen")
        assert not torch.allclose(model(input_ids=ids).logits, mixed)  # the routing changed something


def test_save_load_round_trip_writes_only_the_adapter(saved_dense, tmp_path):
    model = _load_quantized(saved_dense, "phi3", **NF4)
    hlora.inject(model, hlora.HLoRAConfig(**TWO_PLUGINS))
    _randomize(model)
    hlora.set_task(model, ["comp", "gen", None])
    ids = _ids()
    with torch.no_grad():
        want = model(input_ids=ids).logits
    hlora.save(model, tmp_path / "ckpt")
    with safe_open(str(tmp_path / "ckpt" / "hlora_model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    assert keys and all(".plugins." in k for k in keys)  # the quantized base stays the user's

    fresh = _load_quantized(saved_dense, "phi3", **NF4)
    hlora.load(fresh, tmp_path / "ckpt")
    assert all(isinstance(m, QuantizedHLoRALinear) for m in hlora.adapter_layers(fresh))
    hlora.set_task(fresh, ["comp", "gen", None])
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, want)


def test_merge_on_a_4bit_base_is_refused_and_changes_nothing(saved_dense):
    model = _load_quantized(saved_dense, "llama", **NF4)
    hlora.inject(model, hlora.HLoRAConfig(plugins={"one": hlora.PluginConfig(4, 1, 8)}))  # k = 1: mergeable if dense
    _randomize(model)
    ids = _ids()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    with pytest.raises(RuntimeError, match="quantized"):
        hlora.merge(model, "one")
    assert all(layer.merged is None for layer in hlora.adapter_layers(model))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)


def test_baseline_variants_name_the_quantized_base(saved_dense):
    model = _load_quantized(saved_dense, "llama", **NF4)
    with pytest.raises(ValueError, match="quantized-base layer"):
        hlora.inject(model, hlora.HLoRAConfig(plugins={"a": hlora.PluginConfig(4, 1, 8)}, variant="lora"))


def test_from_peft_imports_a_qlora_adapter_onto_the_same_4bit_base(saved_dense, tmp_path):
    peft_model = get_peft_model(
        _load_quantized(saved_dense, "llama", **NF4),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False),
    ).eval()
    assert any(type(m).__name__ == "Linear4bit" and type(m).__module__.startswith("peft") for m in peft_model.modules())
    ids = _ids()
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits
    peft_model.save_pretrained(tmp_path / "qlora")

    ours = _load_quantized(saved_dense, "llama", **NF4)
    with torch.no_grad():
        base = ours(input_ids=ids).logits
    hlora.from_peft(ours, tmp_path / "qlora", plugin="qlora")
    assert len(hlora.adapter_layers(ours)) == 2 * 3
    assert all(isinstance(m, QuantizedHLoRALinear) for m in hlora.adapter_layers(ours))
    with torch.no_grad():
        got = ours(input_ids=ids).logits
    assert not torch.allclose(base, want, atol=1e-3)  # the adapter matters
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_nf4_weight_bytes_counts_what_bitsandbytes_stores():
    for double_quant in (True, False):
        q = _quantized_linear("nf4_double_fp32" if double_quant else "fp4_bf16", nn.Linear(384, 160), "cpu")
        state = q.weight.quant_state
        held = q.weight.data.numel() * q.weight.data.element_size() + state.absmax.numel() * state.absmax.element_size()
        if double_quant:
            held += state.state2.absmax.numel() * state.state2.absmax.element_size() + state.offset.numel() * 4
        assert nf4_weight_bytes(384 * 160, double_quant=double_quant) == held

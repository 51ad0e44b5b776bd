"""Correctness matrix of the Torch-Pruning plugin on every supported family (tiny random configs).

For each family a heterogeneous (global ranking) and a uniform (per-layer) pruning go through
``build_pruner`` + ``step()``. Oracle (torch_pruning.md §5): the pruned model computes the logits
of the original with the removed units masked, under SDPA and eager attention; greedy
``generate()`` with the KV cache gives the masked original's tokens; checkpoints round-trip
bit-identically; uniform checkpoints load in stock transformers in a process that never imports
the plugin; heterogeneous ones fail there loudly and load with ``load_pruned``. The same checks
run once on the real SmolLM2-135M weights (``real_model``; global and uniform budgets; greedy
decoding and the ``load_pruned`` round trip for the global one, the stock load for the uniform one).
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from pg_pruning_plugin import SearchSpace, UnitMasks, UnitValues, load_pruned, masked, save_pruned
from pg_pruning_plugin.integrations.torch_pruning import PolicyGradientImportance, build_pruner
from tests.helpers import greedy, synthetic_result, tiny_model

_SLIDING = dict(sliding_window=4)  # shorter than the test sequences, so the windows matter
ARCHS = {
    "llama-mha": ("llama", dict(num_attention_heads=4, num_key_value_heads=4, head_dim=16)),
    "llama-gqa": ("llama", dict(num_attention_heads=8, num_key_value_heads=2, head_dim=16)),
    "mistral": ("mistral", dict(num_attention_heads=8, num_key_value_heads=4, head_dim=16, **_SLIDING)),
    "qwen2": ("qwen2", dict(num_attention_heads=6, num_key_value_heads=2, head_dim=16)),  # q/k/v biases
    "qwen3": ("qwen3", dict(num_attention_heads=8, num_key_value_heads=4, head_dim=16)),  # q/k norms
    "gemma2": ("gemma2", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=256, **_SLIDING)),  # soft-capping
    "gemma3_text": ("gemma3_text", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=256, **_SLIDING,
                                        layer_types=["sliding_attention", "full_attention", "sliding_attention"])),
}
ATTN_SPARSITY, MLP_SPARSITY = 0.5, 0.3
IDS = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(7))


def arch_model(arch: str) -> torch.nn.Module:
    model_type, overrides = ARCHS[arch]
    model = tiny_model(model_type, **overrides)
    if model_type == "qwen2":  # biases start at zero; make them matter
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.1)
    return model


def logits(model, ids=IDS, impl: str | None = None) -> torch.Tensor:
    previous = model.config._attn_implementation
    if impl:
        model.set_attn_implementation(impl)
    try:
        with torch.no_grad():
            return model(ids).logits
    finally:
        model.set_attn_implementation(previous)


def masked_logits(original, kept: UnitValues, ids=IDS, impl: str | None = None) -> torch.Tensor:
    space = SearchSpace.from_model(original)
    with masked(original, space, UnitMasks(kept.attn, kept.mlp)):
        return logits(original, ids, impl)


@dataclass
class Pruned:
    model: torch.nn.Module
    kept: UnitValues  # masks over the original units
    out_dir: Path


@dataclass
class Case:
    original: torch.nn.Module
    het: Pruned
    uni: Pruned


def prune_copy(original, global_pruning: bool, out_dir: Path, tokenizer=None) -> Pruned:
    model = copy.deepcopy(original)
    importance = PolicyGradientImportance(synthetic_result(model, global_pruning), model)
    build_pruner(model, importance).step()
    save_pruned(model, out_dir, tokenizer)
    return Pruned(model, importance.ledger.kept_masks(), out_dir)


_CASES: dict[str, Case] = {}


@pytest.fixture(scope="module")
def out_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("matrix")


def case(arch: str, root: Path) -> Case:
    if arch not in _CASES:
        original = arch_model(arch)
        _CASES[arch] = Case(original, prune_copy(original, True, root / f"{arch}-het"),
                            prune_copy(original, False, root / f"{arch}-uni"))
    return _CASES[arch]


@pytest.mark.parametrize("arch", ARCHS)
def test_widths_and_config(arch, out_root):
    c = case(arch, out_root)
    before = SearchSpace.from_model(c.original)
    n_kv, n_i = before.num_attn_units, before.num_mlp_units
    het, uni = SearchSpace.from_model(c.het.model), SearchSpace.from_model(c.uni.model)
    assert het.num_attn_units == n_kv - int(n_kv * ATTN_SPARSITY) and het.num_mlp_units == n_i - int(n_i * MLP_SPARSITY)
    assert len({s.intermediate_size for s in het.layers}) > 1  # global ranking: unequal layers
    assert len(set(uni.layers)) == 1
    s0, u0 = before.layers[0], uni.layers[0]
    assert u0.num_kv_groups == s0.num_kv_groups - int(s0.num_kv_groups * ATTN_SPARSITY)
    assert u0.queries_per_group == s0.queries_per_group and u0.head_dim == s0.head_dim
    cfg_u, cfg_h, cfg_0 = c.uni.model.config, c.het.model.config, c.original.config
    assert (cfg_u.num_attention_heads, cfg_u.num_key_value_heads, cfg_u.intermediate_size) == \
        (u0.num_attention_heads, u0.num_kv_groups, u0.intermediate_size)
    assert cfg_u.head_dim == cfg_h.head_dim == s0.head_dim
    assert cfg_h.intermediate_size == max(s.intermediate_size for s in het.layers)  # the widest layer's
    widest_heads = (max(s.num_attention_heads for s in het.layers), max(s.num_kv_groups for s in het.layers))
    original_heads = (cfg_0.num_attention_heads, cfg_0.num_key_value_heads)  # when the config class rejects those
    assert (cfg_h.num_attention_heads, cfg_h.num_key_value_heads) in (widest_heads, original_heads)
    assert [w["intermediate_size"] for w in cfg_h.pruned_layers] == [s.intermediate_size for s in het.layers]
    for model in (c.het.model, c.uni.model):
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                assert (module.out_features, module.in_features) == tuple(module.weight.shape)
        assert model.config._attn_implementation == "sdpa"  # tracing switched to eager and back


@pytest.mark.parametrize("arch", ARCHS)
def test_pruned_equals_masked(arch, out_root):
    c = case(arch, out_root)
    for variant, pruned in (("global", c.het), ("uniform", c.uni)):
        for impl in ("sdpa", "eager"):
            ref = masked_logits(c.original, pruned.kept, impl=impl)
            got = logits(pruned.model, impl=impl)
            assert (ref - logits(c.original, impl=impl)).abs().max() > 1e-3  # the masks matter
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
            print(f"{arch} {variant} {impl}: max |pruned - masked| = {(got - ref).abs().max():.1e} "
                  f"(max |logit| {ref.abs().max():.2f})")


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_with_cache(arch, out_root):
    c = case(arch, out_root)
    for pruned in (c.het, c.uni):
        space = SearchSpace.from_model(c.original)
        with masked(c.original, space, UnitMasks(pruned.kept.attn, pruned.kept.mlp)):
            expected = greedy(c.original, IDS[:1])
        assert torch.equal(greedy(pruned.model, IDS[:1]), expected)


@pytest.mark.parametrize("arch", ARCHS)
def test_checkpoints_round_trip(arch, out_root):
    c = case(arch, out_root)
    for pruned in (c.het, c.uni):
        assert torch.equal(logits(load_pruned(pruned.out_dir)), logits(pruned.model))
    with pytest.raises(Exception, match="(?i)size mismatch|mismatched"):  # never silently re-initialised
        AutoModelForCausalLM.from_pretrained(c.het.out_dir)


_STOCK_LOAD = """
import json, sys, torch
from transformers import AutoModelForCausalLM
torch.set_num_threads(int(sys.argv[3]))  # the parent's: the same fp32 summation order
out = {}
for path in json.loads(sys.argv[1]):
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        out[path] = model(torch.load(sys.argv[2])).logits.tolist()
assert not any(m.startswith("pg_pruning_plugin") for m in sys.modules)
print(json.dumps(out))
"""


def stock_logits(dirs: list[Path], ids: torch.Tensor, tmp: Path) -> dict[str, torch.Tensor]:
    """Logits from ``AutoModelForCausalLM.from_pretrained`` in a fresh interpreter without the plugin."""
    torch.save(ids, tmp / "ids.pt")
    proc = subprocess.run([sys.executable, "-c", _STOCK_LOAD, json.dumps([str(d) for d in dirs]), str(tmp / "ids.pt"),
                           str(torch.get_num_threads())],
                          capture_output=True, text=True, timeout=300, cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {k: torch.tensor(v) for k, v in json.loads(proc.stdout.strip().splitlines()[-1]).items()}


def test_uniform_checkpoints_load_in_stock_transformers(out_root):
    cases = {arch: case(arch, out_root) for arch in ARCHS}
    got = stock_logits([c.uni.out_dir for c in cases.values()], IDS, out_root)
    for arch, c in cases.items():
        torch.testing.assert_close(got[str(c.uni.out_dir)], logits(c.uni.model), rtol=0, atol=1e-6, msg=arch)


@pytest.mark.real_model
def test_smollm2_real_weights(tmp_path):
    """The matrix checks once on SmolLM2-135M (30 layers, 9 q / 3 KV heads, 1536 channels)."""
    from pg_pruning_plugin.resources.models import load_model

    original, tokenizer = load_model()
    ids = torch.tensor([tokenizer("The pruned model must compute the same logits as the masked one.")["input_ids"]])
    result = synthetic_result(original, True, attn_sparsity=0.3)
    reference_logits = logits(original, ids)
    for global_pruning in (True, False):
        model = copy.deepcopy(original)
        importance = PolicyGradientImportance(result, model)
        if global_pruning:  # 30 % of all 90 KV groups and of all 46,080 channels, ranked globally
            build_pruner(model, importance).step()
            kept = importance.ledger.kept_masks()
            # the core's exact global top-k (each layer's best unit reserved) and the plugin agree
            assert torch.equal(kept.mlp, result.masks.mlp) and torch.equal(kept.attn, result.masks.attn)
            assert kept.attn.sum() == 63
        else:  # one of 3 KV groups and 30 % of the channels in every layer: 6 query heads divide 576
            build_pruner(model, importance, attn_ratio=1 / 3, global_pruning=False).step()
            kept = importance.ledger.kept_masks()
            assert [(s.num_kv_groups, s.intermediate_size) for s in SearchSpace.from_model(model).layers] == \
                [(2, 1536 - 460)] * 30
        after = SearchSpace.from_model(model)
        assert min(s.num_kv_groups for s in after.layers) >= 1
        assert after.num_mlp_units == 46080 - (int(46080 * 0.3) if global_pruning else 30 * 460)
        ref, got = masked_logits(original, kept, ids), logits(model, ids)
        assert (ref - reference_logits).abs().max() > 1.0
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-4 * float(ref.abs().max()))  # fp32 sum order
        print(f"SmolLM2 {'global' if global_pruning else 'uniform'}: max |pruned - masked| = "
              f"{(got - ref).abs().max():.2e}, max |logit| = {ref.abs().max():.1f}")
        out = save_pruned(model, tmp_path / ("het" if global_pruning else "uni"), tokenizer)
        if global_pruning:
            with masked(original, SearchSpace.from_model(original), UnitMasks(kept.attn, kept.mlp)):
                expected = greedy(original, ids, tokens=4)
            assert torch.equal(greedy(model, ids, tokens=4), expected)
            assert torch.equal(logits(load_pruned(out), ids), got)
        else:
            stock = stock_logits([out], ids, tmp_path)[str(out)]
            torch.testing.assert_close(stock, got, rtol=0, atol=1e-5)

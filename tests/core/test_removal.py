"""Physical removal: pruned logits equal masked logits on every family, whole blocks, checkpoints."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from pg_pruning_plugin import SearchSpace, UnitMasks, UnitValues, load_pruned, masked, prune_model, save_pruned
from pg_pruning_plugin.core.removal import RemovedAttention, RemovedMLP
from tests.helpers import ARCH_CASES, ARCH_IDS, greedy, random_masks, tiny_model

IDS = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))
ALL_CASES = ARCH_CASES + [("llama", {"attention_bias": True, "mlp_bias": True})]  # o/down biases too


@pytest.mark.parametrize("model_type,overrides", ALL_CASES, ids=ARCH_IDS + ["llama-biases"])
def test_removed_units_match_masked_logits_generate_and_reload(model_type, overrides, tmp_path):
    model = tiny_model(model_type, **overrides)
    if overrides.get("attention_bias") or model_type == "qwen2":  # biases start at zero; make them matter
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.1)
    space = SearchSpace.from_model(model)
    masks = random_masks(space, keep=0.5, seed=3)
    with torch.no_grad(), masked(model, space, masks):
        expected, expected_tokens = model(IDS).logits, greedy(model, IDS[:1])
    assert (expected - model(IDS).logits).abs().max() > 1e-3  # the masks matter
    prune_model(model, masks)
    after = SearchSpace.from_model(model)
    assert [(s.num_kv_groups, s.intermediate_size) for s in after.layers] == \
        [(int(masks.attn[space.attn_slice(i)].sum()), int(masks.mlp[space.mlp_slice(i)].sum()))
         for i in range(space.num_layers)]
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            assert (module.out_features, module.in_features) == tuple(module.weight.shape)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, expected, rtol=1e-4, atol=1e-5)
        assert torch.equal(greedy(model, IDS[:1]), expected_tokens)
    save_pruned(model, tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(load_pruned(tmp_path / "out")(IDS).logits, model(IDS).logits)


def _block_masks(space: SearchSpace) -> UnitValues:
    """Layer 0 loses its attention, layer 1 both blocks (it disappears), layer 2 its MLP; plus some widths."""
    masks = UnitValues(torch.ones(space.num_attn_units), torch.ones(space.num_mlp_units),
                       torch.tensor([0.0, 0.0, 1.0]), torch.tensor([1.0, 0.0, 0.0]))
    masks.mlp[space.mlp_offsets[0] + 5] = 0
    masks.attn[space.attn_offsets[2]] = 0
    return masks


@pytest.mark.parametrize("model_type,overrides", ARCH_CASES, ids=ARCH_IDS)
def test_removed_blocks_match_masked_logits_generate_and_reload(model_type, overrides, tmp_path):
    model = tiny_model(model_type, **overrides)
    space = SearchSpace.from_model(model)
    masks = _block_masks(space)
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), masked(model, space, UnitMasks(**masks.as_dict())):
        expected = model(ids).logits
        expected_tokens = model.generate(ids[:1, :5], max_new_tokens=8, do_sample=False)
    prune_model(model, masks)
    assert model.config.num_hidden_layers == 2
    layers = model.model.layers
    assert isinstance(layers[0].self_attn, RemovedAttention) and isinstance(layers[1].mlp, RemovedMLP)
    assert not any("layers.1.mlp" in n for n, _ in model.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, atol=1e-5, rtol=1e-5)
        assert torch.equal(model.generate(ids[:1, :5], max_new_tokens=8, do_sample=False), expected_tokens)
    save_pruned(model, tmp_path / "out")
    reloaded = load_pruned(tmp_path / "out")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_whole_layer_removal_gives_a_stock_checkpoint(tmp_path):
    model = tiny_model("llama")
    space = SearchSpace.from_model(model)
    keep_middle = torch.tensor([1.0, 0.0, 1.0])
    masks = UnitValues(torch.ones(space.num_attn_units), torch.ones(space.num_mlp_units), keep_middle,
                       keep_middle.clone())
    ids = torch.randint(0, 200, (1, 10))
    with torch.no_grad(), masked(model, space, UnitMasks(**masks.as_dict())):
        expected = model(ids).logits
    prune_model(model, masks)
    save_pruned(model, tmp_path / "out")
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # no plugin class involved
    assert stock.config.num_hidden_layers == 2
    with torch.no_grad():
        torch.testing.assert_close(stock(ids).logits, expected, atol=1e-5, rtol=1e-5)



def test_uniform_widths_the_config_rejects_still_save_and_load(tmp_path):
    model = tiny_model("llama", num_attention_heads=12, num_key_value_heads=4, head_dim=8, hidden_size=96)
    space = SearchSpace.from_model(model)
    attn = torch.ones(space.num_attn_units)
    attn[0::4] = 0  # 9 query heads per layer: 96 % 9 != 0, which LlamaConfig refuses
    prune_model(model, UnitValues(attn, torch.ones(space.num_mlp_units)))
    assert model.config.num_attention_heads == 12 and model.config.pruned_layers[0]["num_attention_heads"] == 9
    save_pruned(model, tmp_path / "out")
    ids = torch.randint(0, 200, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(load_pruned(tmp_path / "out")(ids).logits, model(ids).logits)

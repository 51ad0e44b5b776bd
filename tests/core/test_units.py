"""The unit vocabulary: UnitValues and UnitMasks convert into each other without losing block entries."""

import torch

from pg_pruning_plugin import SearchSpace, UnitMasks, UnitScores, UnitValues


def test_conversions_keep_block_masks(llama):
    space = SearchSpace.from_model(llama)
    values = UnitValues.full(space, 1.0, blocks=True)
    values.mlp_blocks[1] = 0
    masks = values.as_masks()
    assert masks.num_samples == 1 and masks.has_blocks
    back = masks.sample(0)
    assert back.as_dict().keys() == values.as_dict().keys()
    assert all(torch.equal(back.as_dict()[k], v) for k, v in values.as_dict().items())
    assert UnitMasks.of(values).mlp_blocks.tolist() == [[1.0, 0.0, 1.0]]
    assert UnitMasks.of(masks) is masks
    # a removed block zeroes its units when folded into width masks
    folded = masks.folded(space)
    assert not folded.has_blocks and folded.mlp[0, space.mlp_slice(1)].sum() == 0


def test_stepped_moves_only_the_given_types():
    values = UnitValues(torch.ones(3), torch.ones(2), torch.ones(1), torch.ones(1))
    stepped = values.stepped({"attn": torch.tensor([1.0, 0.0, -1.0])}, lr=0.5)
    assert stepped.attn.tolist() == [0.5, 1.0, 1.5] and stepped.mlp is values.mlp
    assert stepped.map(torch.neg).attn_blocks.tolist() == [-1.0]


def test_unit_scores_is_the_public_name_of_unit_values():
    assert UnitScores is UnitValues

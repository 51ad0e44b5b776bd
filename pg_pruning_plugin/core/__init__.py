"""What a unit is and how a mask acts on a model: architectures and search spaces, unit values and
masks, selection rules, masked and sub-network execution, physical removal, checkpoints."""

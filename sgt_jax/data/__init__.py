"""SGT data: sources -> records -> samples (sequence plans) -> packer -> PackedBatch."""

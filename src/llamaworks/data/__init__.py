"""The pre-training data pipeline of section 2.1: sources -> cleaned, deduplicated document shards."""

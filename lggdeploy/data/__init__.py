"""kaggle_3m data: reader/validator, split, phantom generator, pre/post-processing."""

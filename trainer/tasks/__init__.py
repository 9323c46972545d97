"""One module per task family; each is a LightningModule whose training step reads like the algorithm."""

"""Divergence forensics: watch every step, act on NaNs, spikes and GAN collapse, keep a replayable bundle of
the step that went wrong (`python -m trainer.replay BUNDLE`), and the tools to find a fix before the next
long run (fault injection, an LR range test, initial-loss and numerical gradient checks)."""

"""hydra/launcher=fused: jobs that share an architecture train as one fused model.

See normbench.fused_launch."""

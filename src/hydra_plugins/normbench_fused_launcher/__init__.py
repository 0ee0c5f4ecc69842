"""hydra/launcher=fused: jobs that share an architecture train as one fused model (normbench.fused_launch)."""

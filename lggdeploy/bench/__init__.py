"""`lggdeploy bench`: run (latency + accuracy rows), stats (latency, paired deltas, intervals), report, plots."""

"""The index phase (NDS "server, offline"): one module per dvc.yaml stage.

extract -> cluster -> experts (stage train_experts) -> weights (stage compute_weights);
`stages.run_stage(NAME)` is what `nds stage NAME` and dvc.yaml run, `_artifacts` what the
stages share, `layout` the per-cluster member layout the clustered sampler reads.
"""

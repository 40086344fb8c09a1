"""The engine that runs every family: the family registry and protocol (`registry`, `base`,
`dtype_policy`, `compat`, `observed`), the per-layer hooks and pooling (`hooks`,
`residual_stream`, `pooling`, `modality`), and the run loop that writes features
(`features`, `extra_outputs`, `state_input`)."""

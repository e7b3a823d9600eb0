"""DeepSpeed as a second backend of the engine (engine.backend deepspeed).

`DeepSpeedBackend` (dist_mtl.deepspeed.backend, imported on demand: DeepSpeed is an optional extra)
runs the engine's protocols unchanged and hands the shared encoder's optimizer step to a DeepSpeed
engine (ZeRO 0-3, bf16, CPU optimizer offload); `settings` builds its JSON and is importable without
DeepSpeed, so config validation refuses bad input before any process starts.
"""

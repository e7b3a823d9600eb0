"""DeepSpeed as a second backend of the engine (engine.backend deepspeed).

`DeepSpeedBackend` (dist_mtl.deepspeed.backend, imported on demand: DeepSpeed is an optional extra)
runs the engine's protocols unchanged and hands the shared encoder's optimizer step to a DeepSpeed
engine (ZeRO 0-3, bf16, CPU optimizer offload). Its JSON comes from `dist_mtl.deepspeed_settings`, a
module of its own that imports neither DeepSpeed nor this package, so config validation refuses bad
input before any process starts (and config, which the backend imports, never imports the backend).
"""

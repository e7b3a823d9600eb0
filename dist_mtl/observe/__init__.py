"""Observability: phase timers, byte counters, metric sinks, a profiler window and the profile report."""

from dist_mtl.observe.profiler import ProfilerWindow
from dist_mtl.observe.recorder import PHASES, StepRecorder
from dist_mtl.observe.report import profile_report
from dist_mtl.observe.sinks import JsonlSink, MetricSink, MultiSink, TensorBoardSink

__all__ = [
    "PHASES",
    "JsonlSink",
    "MetricSink",
    "MultiSink",
    "ProfilerWindow",
    "StepRecorder",
    "TensorBoardSink",
    "profile_report",
]

"""Benchmark data: Sample / Task / Stream, the release reader, synthetic twins."""

from mllmcl.data.release import load_image, load_stream, load_task
from mllmcl.data.streams import ACL, DCL, STREAMS, StreamSpec, get_stream_spec
from mllmcl.data.types import Sample, Stream, Task, TaskSpec

__all__ = [
    "ACL", "DCL", "STREAMS", "Sample", "Stream", "StreamSpec", "Task", "TaskSpec",
    "get_stream_spec", "load_image", "load_stream", "load_task",
]

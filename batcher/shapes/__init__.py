"""API shapes: one module per wire format, all behind one interface (`base.Shape`), chosen once per job.

    shape = shape_for(spec.request, spec.endpoint.api, reserved=RESULT_COLUMNS)
    body = shape.body(row.prompt, model, row.inputs, row.body)      # prompt: a string or rendered messages
    answer = shape.parse(content)       # or: folder = shape.new_stream(); folder.feed_line(...); folder.result()
    record = shape.record(answer)       # ContractError / SchemaViolation: retried; Refused: an error row

- `completions.py`: the legacy POST /v2/router/completions (and /v1/completions).
- `chat.py`: POST /v2/router/chat/completions (and /v1/chat/completions), messages and structured outputs;
  `chat_spec.py` its request fields, `chat_sim.py` the simulated gateway's handler for it.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

from ..spec import RESULT_COLUMN_NAMES, JobSpec, RequestSpec, kept_column_name
from .base import Answer, Api, ContractError, Prompt, Refused, SchemaViolation, Shape, StreamFolder
from .chat import ChatShape
from .chat_spec import ChatRequestSpec
from .completions import CompletionsShape

__all__ = [
    "Answer",
    "Api",
    "ChatShape",
    "CompletionsShape",
    "ContractError",
    "Prompt",
    "Refused",
    "SchemaViolation",
    "Shape",
    "StreamFolder",
    "shape_for",
    "shape_of_job",
]


def shape_for(
    request: RequestSpec | ChatRequestSpec, api: Api, *, reserved: Collection[str] = (), base_dir: Path | None = None
) -> Shape:
    """The shape a spec's request block speaks: a chat request makes a chat job, anything else completions."""
    if isinstance(request, ChatRequestSpec):
        return ChatShape(request, api, reserved=reserved, base_dir=base_dir)
    return CompletionsShape(request, api)


def shape_of_job(spec: JobSpec) -> Shape:
    """The shape a job speaks, built once. A json_schema property named like one of the output's other columns
    (batcher's, the id, a kept column) gets the `answer_` prefix."""
    id_name = spec.input.id_name
    reserved = {*RESULT_COLUMN_NAMES, id_name}
    reserved.update(kept_column_name(c, id_name) for c in spec.output.keep_columns if c != spec.input.id_source)
    return shape_for(spec.request, spec.endpoint.api, reserved=reserved)

"""Library log lines that say nothing to a user of this project, filtered as precisely as their text.

Installed by every entry point before the diffusers/transformers imports (the CLI, and ``tasks``,
which every ``python -m flows.<stage>`` imports first), so neither commands nor stage logs repeat them.
"""

from __future__ import annotations

import logging
import re


class MessageFilter(logging.Filter):
    """Drops the records of one logger whose message matches ``pattern`` (from its start), nothing else."""

    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


TRANSFORMERS_IMPORT_LOGGER = "transformers.utils.import_utils"
DIFFUSERS_PIPELINE_LOGGER = "diffusers.pipelines.pipeline_utils"
DIFFUSERS_MODELING_LOGGER = "diffusers.models.modeling_utils"
#: Library warnings that say nothing to a user of this CLI, by logger, as precise as their text:
#: - transformers 5 logs, once per image-processor class that diffusers' import touches
#:   (``_LazyModule.__getattr__``, transformers/utils/import_utils.py: CLIPImageProcessor and
#:   SiglipImageProcessor, on every command, ``--help`` included), that it "requires torchvision (not
#:   installed); falling back to `...Pil`": the PIL processor is the one this project uses.
#: - diffusers warns that the tiny-minilm pipeline's text encoder is a BertModel where
#:   StableDiffusionPipeline's annotation says CLIPTextModel (pipeline_utils.py, ``from_pretrained``):
#:   that is the preset's design (models.build_tiny_minilm_pipeline).
#: - diffusers 0.42's ``ModelMixin.to(dtype)`` warns "There are modules in UNet2DConditionModel that should
#:   be kept in float32: []" whenever a dtype is passed, also when that list is empty (modeling_utils.py,
#:   ``fp32_modules is not None``): nothing is kept in float32, nothing is inconsistent. A non-empty list
#:   still shows.
QUIET_WARNINGS: dict[str, str] = {
    TRANSFORMERS_IMPORT_LOGGER: r"`\w+ImageProcessor` requires torchvision \(not installed\); falling back "
                                r"to `\w+ImageProcessorPil`",
    DIFFUSERS_PIPELINE_LOGGER: r"Expected types for text_encoder: \(<class 'transformers\.models\.clip\."
                               r"modeling_clip\.CLIPTextModel'>,\), got <class 'transformers\.models\.bert\."
                               r"modeling_bert\.BertModel'>\.$",
    DIFFUSERS_MODELING_LOGGER: r"There are modules in \w+ that should be kept in float32: \[\]\.",
}


def silence_known_warnings() -> None:
    """Install a :class:`MessageFilter` for each of :data:`QUIET_WARNINGS` (once; before the
    diffusers/transformers imports, which log the first)."""
    for name, pattern in QUIET_WARNINGS.items():
        log = logging.getLogger(name)
        if not any(isinstance(f, MessageFilter) and f.pattern.pattern == pattern for f in log.filters):
            log.addFilter(MessageFilter(pattern))

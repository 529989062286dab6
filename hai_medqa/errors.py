"""The base of every error the project reports to a user as one line (``error: ...``, non-zero exit).

Each stage raises its own subclass, which also keeps its standard base (ValueError or RuntimeError)
so callers that catch those still work. Entry points run through `hai_medqa.cli.run_cli`, which
prints a `HaiMedQAError` (or an OSError) as ``error: <first line>`` without a traceback; anything
else is a bug and keeps its traceback.

One class per meaning - raise the one that says what the user has to fix, never a second class
with the same meaning in another module:

==========================================  =====================================================
meaning                                     class
==========================================  =====================================================
a path argument of the wrong kind, or an    `hai_medqa.guards.PathError` (folder where a file is
output that collides with an input          expected, output that is/contains/lies in an input)
a config file or override                   `hai_medqa.config.ConfigError`
the AI Hub input of preprocessing           `hai_medqa.data.schema.DataError`
the jsonl given to training / evaluation    `hai_medqa.train.errors.TrainingDataError`
a conversation that cannot be rendered      `hai_medqa.chat_format.ChatFormatError`
a checkpoint's layout, config or download   `hai_medqa.model.exaone_layout.ModelLayoutError`
                                            (`model.acquire.ModelAcquisitionError`: fetching)
a training run that cannot start/continue   `hai_medqa.train.errors.TrainingError`
a LoRA adapter folder                       `hai_medqa.merge.lora.AdapterError`
a safetensors file                          `hai_medqa.merge.safetensors_stream.SafetensorsFormatError`
a merge                                     `hai_medqa.merge.streaming.MergeError`
the model card / the Hub upload             `hai_medqa.publish.model_card.ModelCardError`,
                                            `hai_medqa.publish.hub.PublishError`
chat / evaluation flags, model loading,     `hai_medqa.inference.generation.InferenceError`
resumable outputs
the safety keyword file                     `hai_medqa.inference.safety.SafetyConfigError`
the safety classifier's weights / corpus    `hai_medqa.inference.safety_classifier.SafetyClassifierError`
                                            (`inference.safety_train.SafetyTrainError`: its corpus)
a KorMedMCQA download                       `hai_medqa.evaluation.kormedmcqa.KorMedMCQAError`
==========================================  =====================================================

``tests/common/test_errors.py`` checks that every error class of the package derives from
`HaiMedQAError` and that no two share a name.
"""


class HaiMedQAError(Exception):
    """A problem with the user's input, files or environment, explained in one line."""

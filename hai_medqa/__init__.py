"""HAI MedQA: AI Hub Korean healthcare QA -> QLoRA fine-tuned EXAONE-3.5 -> Hugging Face Hub.

Modules follow the data's path:
  data (read -> pair -> records) -> chat_format -> model (acquire/convert/load) -> train
  -> merge -> publish -> inference / evaluation.
"""

__version__ = "0.1.0"

from hai_medqa import third_party_noise as _third_party_noise

_third_party_noise.install()  # before any library import: messages that ask users to install what they do not need

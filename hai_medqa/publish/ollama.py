"""An Ollama Modelfile for an exported GGUF that renders prompts exactly as training did.

Ollama's template autodetection has no EXAONE entry, and both its own ``exaone3.5`` library template
and llama.cpp's built-in ``exaone3`` template drop the empty ``[|system|][|endofturn|]\\n`` turn that
EXAONE's official template (and therefore this project's training) renders when a conversation has no
system message. `OLLAMA_TEMPLATE` is a Go template written from the same rules as
`hai_medqa.chat_format.render`; tests execute it with Go's text/template (what Ollama uses) and
compare with the jinja template byte for byte.
"""

from __future__ import annotations

from pathlib import Path

from hai_medqa.chat_format import EOT

# Go text/template over Ollama's .Messages (Role, Content). A conversation ending with a user turn
# gets the generation prompt "[|assistant|]"; one ending with an assistant turn is left open so
# Ollama continues that answer (its convention for a prefilled reply).
OLLAMA_TEMPLATE = (
    '{{- if or (not .Messages) (ne (index .Messages 0).Role "system") }}[|system|][|endofturn|]\n'
    "{{ end }}\n"
    "{{- range $i, $m := .Messages }}\n"
    "{{- $last := eq (len (slice $.Messages $i)) 1 }}\n"
    '{{- if eq $m.Role "system" }}[|system|]{{ $m.Content }}[|endofturn|]\n'
    '{{ else if eq $m.Role "user" }}[|user|]{{ $m.Content }}\n'
    "{{ if $last }}[|assistant|]{{ end }}\n"
    '{{- else if eq $m.Role "assistant" }}[|assistant|]{{ $m.Content }}{{ if not $last }}[|endofturn|]\n'
    "{{ end }}\n"
    "{{- end }}\n"
    "{{- end }}"
)
MODELFILE_NAME = "Modelfile"


def _quoted(text: str, what: str) -> str:
    if '"""' in text:
        raise ValueError(f"the {what} contains '\"\"\"', which a Modelfile cannot quote")
    return f'"""{text}"""'


def modelfile_text(gguf_file: str, *, system_prompt: str | None, license_text: str | None = None) -> str:
    """The Modelfile for ``FROM ./<gguf_file>``: EXAONE's TEMPLATE, stop ``[|endofturn|]``, the trained
    system prompt as SYSTEM (omitted when training used none: the template then renders the empty
    system turn, as in training), and the license text when given."""
    lines = [
        "# Ollama Modelfile: ollama create <name> -f Modelfile",
        "# TEMPLATE renders exactly as EXAONE-3.5's chat template (including the empty system turn",
        "# when there is no system message), stop at [|endofturn|], no BOS.",
        f"FROM ./{gguf_file}",
        f"TEMPLATE {_quoted(OLLAMA_TEMPLATE, 'template')}",
    ]
    if system_prompt:
        lines.append(f"SYSTEM {_quoted(system_prompt, 'system prompt')}")
    lines.append(f'PARAMETER stop "{EOT}"')
    if license_text:
        lines.append(f"LICENSE {_quoted(license_text.strip(), 'license')}")
    return "\n".join(lines) + "\n"


def write_modelfile(folder: str | Path, gguf_file: str, *, system_prompt: str | None,
                    license_text: str | None = None) -> Path:
    """Write `folder`/Modelfile (see `modelfile_text`)."""
    from hai_medqa.io_utils import atomic_write_text

    path = Path(folder) / MODELFILE_NAME
    atomic_write_text(path, modelfile_text(gguf_file, system_prompt=system_prompt, license_text=license_text))
    return path

"""The Modelfile's TEMPLATE, executed by Go's text/template (the language Ollama's TEMPLATE is
written in; Ollama passes .Messages with Role and Content), renders every conversation exactly as
EXAONE's jinja template and training do, including the empty system turn Ollama's own exaone3.5
template drops."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from engines.engine_texts import CONVERSATIONS

from hai_medqa.chat_format import EXAONE_CHAT_TEMPLATE, render
from hai_medqa.publish.ollama import OLLAMA_TEMPLATE

RENDERER = Path(__file__).with_name("go_template") / "main.go"
# Ollama's library entry for exaone3.5 (real_clients.md): no empty system turn.
OLLAMA_LIBRARY_EXAONE = (
    "{{- range .Messages }}{{ if eq .Role \"system\" }}[|system|]{{ .Content }}[|endofturn|]\n"
    "{{ else if eq .Role \"user\" }}[|user|]{{ .Content }}\n"
    "{{ else if eq .Role \"assistant\" }}[|assistant|]{{ .Content }}[|endofturn|]\n"
    "{{ end }}{{ end }}[|assistant|]"
)


def _go_render(go: str, template: str, messages: list[dict], tmp_path: Path) -> str:
    proc = subprocess.run([go, "run", str(RENDERER)], input=json.dumps({"template": template, "messages": messages}),
                          capture_output=True, text=True, timeout=300,
                          env={"GOCACHE": str(tmp_path / "gocache"), "GOPATH": str(tmp_path / "gopath"),
                               "HOME": str(tmp_path), "PATH": str(Path(go).parent), "CGO_ENABLED": "0"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_modelfile_template_renders_like_training(go_binary, tmp_path):
    from jinja2 import Template

    cases = CONVERSATIONS + [
        [{"role": "system", "content": ""}, {"role": "user", "content": "빈 시스템 프롬프트"}],
        [{"role": "user", "content": "여러 줄\n질문"}, {"role": "assistant", "content": "답\n변"},
         {"role": "user", "content": "다시"}],
    ]
    for conv in cases:
        want = render(conv, add_generation_prompt=True)
        assert Template(EXAONE_CHAT_TEMPLATE).render(messages=conv, add_generation_prompt=True) == want
        assert _go_render(go_binary, OLLAMA_TEMPLATE, conv, tmp_path) == want, conv


def test_ollama_library_template_drops_the_empty_system_turn(go_binary, tmp_path):
    """Why the Modelfile carries its own TEMPLATE: the library one renders another prompt."""
    conv = [{"role": "user", "content": "두통"}]
    assert _go_render(go_binary, OLLAMA_LIBRARY_EXAONE, conv, tmp_path) == "[|user|]두통\n[|assistant|]"
    assert _go_render(go_binary, OLLAMA_TEMPLATE, conv, tmp_path) == render(conv, add_generation_prompt=True)


def test_release_modelfile(gguf_release, merged_release):
    from hai_medqa.run_folder import trained_system_prompt

    text = (gguf_release / "Modelfile").read_text(encoding="utf-8")
    (first,) = [line for line in text.splitlines() if line.startswith("FROM ")]
    assert (gguf_release / first.removeprefix("FROM ./")).is_file()
    assert f'TEMPLATE """{OLLAMA_TEMPLATE}"""' in text
    assert f'SYSTEM """{trained_system_prompt(merged_release)}"""' in text
    assert 'PARAMETER stop "[|endofturn|]"' in text
    assert 'LICENSE """' in text

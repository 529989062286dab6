"""chat.py end to end on the tiny stand-in: the REPL driven through stdin keeps history rendered by
the chat-format module, commands work, safety texts surround the answer; --prompt; jsonl batch mode;
clear errors."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest

from hai_medqa import chat_format
from hai_medqa.cli import run_cli
from hai_medqa.inference.chat_cli import main as chat_main
from hai_medqa.inference.generation import GenerationSettings, generate, load_for_inference
from hai_medqa.inference.safety import SafetyLayer

MAX_NEW = 6
SYS = chat_format.DEFAULT_SYSTEM_PROMPT


@pytest.fixture(scope="module")
def tiny_lm(tiny_exaone_dir):
    return load_for_inference(str(tiny_exaone_dir), dtype="float32", device="cpu")


def _answer(lm, messages) -> str:
    prompt = chat_format.render(messages, add_generation_prompt=True)
    return generate(lm, [prompt], GenerationSettings(max_new_tokens=MAX_NEW))[0]


def test_repl_keeps_history_and_handles_commands(repo_root, tiny_exaone_dir, tiny_lm):
    turns = ["배가 아파요", "오른쪽 하복부요", "/reset", "가슴이 아프고 숨쉬기가 힘들어요", "/system 짧게 답하세요",
             "열이 나요", "/exit", "이 줄은 읽히지 않아야 합니다"]
    proc = subprocess.run(
        [sys.executable, str(repo_root / "chat.py"), "--model", str(tiny_exaone_dir), "--dtype", "float32",
         "--device", "cpu", "--max-new-tokens", str(MAX_NEW), "--show-prompt"],
        input="\n".join(turns) + "\n", capture_output=True, text=True, encoding="utf-8", timeout=300,
        cwd=repo_root, env={**os.environ, "PYTHONIOENCODING": "utf-8"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    prompts = [json.loads(line[len("[prompt] "):]) for line in proc.stderr.splitlines() if line.startswith("[prompt] ")]
    assert len(prompts) == 4  # four messages; commands and the line after /exit generate nothing

    sys_msg = {"role": "system", "content": SYS}
    u1, u2 = {"role": "user", "content": turns[0]}, {"role": "user", "content": turns[1]}
    a1 = {"role": "assistant", "content": _answer(tiny_lm, [sys_msg, u1])}
    # turn 1 and turn 2: the second prompt holds the first exchange, rendered by chat_format
    assert prompts[0] == chat_format.render([sys_msg, u1], add_generation_prompt=True)
    assert prompts[1] == chat_format.render([sys_msg, u1, a1, u2], add_generation_prompt=True)
    assert a1["content"] and a1["content"] in proc.stdout  # streamed to the terminal
    # /reset forgets the history
    u3 = {"role": "user", "content": turns[3]}
    assert prompts[2] == chat_format.render([sys_msg, u3], add_generation_prompt=True)
    # /system replaces the system prompt and starts over
    assert prompts[3] == chat_format.render([{"role": "system", "content": "짧게 답하세요"},
                                             {"role": "user", "content": turns[5]}], add_generation_prompt=True)

    out = proc.stdout
    safety = SafetyLayer()
    assert out.count(safety.disclaimer) == 4  # every answer ends with the disclaimer
    emergency = safety.notices(turns[3])
    assert out.count(emergency) == 1  # only the chest-pain message triggers 119
    # the 119 guidance comes before the model's text of that turn
    idx = out.index(emergency)
    assert out.index("AI> ", idx) > idx
    assert "(대화를 초기화했습니다" in out


def test_prompt_mode_and_no_safety(tiny_exaone_dir, tiny_lm, capsys):
    question = "죽고 싶어요"
    args = ["--model", str(tiny_exaone_dir), "--dtype", "float32", "--device", "cpu", "--max-new-tokens", str(MAX_NEW)]
    assert chat_main([*args, "--prompt", question]) == 0
    out = capsys.readouterr().out
    safety = SafetyLayer()
    assert out.startswith(safety.notices(question))  # 109 / 1577-0199 before anything else
    assert "109" in out and "1577-0199" in out and out.rstrip().endswith(safety.disclaimer)
    expected = _answer(tiny_lm, [{"role": "system", "content": SYS}, {"role": "user", "content": question}])
    assert expected in out

    assert chat_main([*args, "--prompt", question, "--no-safety", "--system-prompt", ""]) == 0
    out = capsys.readouterr().out
    assert "109" not in out and safety.disclaimer not in out
    assert _answer(tiny_lm, [{"role": "user", "content": question}]) in out


def test_batch_mode(tmp_path, tiny_exaone_dir, tiny_lm, capsys):
    lines = [
        json.dumps({"instruction": "두통 예방법을 알려주세요", "output": "참고 답변", "question_id": "q1"}, ensure_ascii=False),
        "{not json",
        json.dumps({"prompt": "가슴이 아프고 숨쉬기가 힘들어요"}, ensure_ascii=False),
        json.dumps({"foo": "bar"}),
        "",
        json.dumps({"messages": [{"role": "user", "content": "열이 나요"}, {"role": "assistant", "content": "언제부터요?"},
                                 {"role": "user", "content": "어제부터요"}]}, ensure_ascii=False),
    ]
    src, dst = tmp_path / "q.jsonl", tmp_path / "out" / "a.jsonl"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    rc = chat_main(["--model", str(tiny_exaone_dir), "--dtype", "float32", "--device", "cpu",
                    "--max-new-tokens", str(MAX_NEW), "--input", str(src), "--output", str(dst), "--batch-size", "2"])
    assert rc == 0
    out = [json.loads(x) for x in dst.read_text(encoding="utf-8").splitlines()]
    assert len(out) == 3  # two bad lines skipped (reported on stderr)
    assert out[0]["question_id"] == "q1" and out[0]["output"] == "참고 답변"  # input fields kept
    # the batched answers equal one-by-one generation of the same conversations
    sys_msg = {"role": "system", "content": SYS}
    convs = [[sys_msg, {"role": "user", "content": "두통 예방법을 알려주세요"}],
             [sys_msg, {"role": "user", "content": "가슴이 아프고 숨쉬기가 힘들어요"}],
             [sys_msg, {"role": "user", "content": "열이 나요"}, {"role": "assistant", "content": "언제부터요?"},
              {"role": "user", "content": "어제부터요"}]]
    assert [o["model_answer"] for o in out] == [_answer(tiny_lm, c) for c in convs]
    assert [o["safety"] for o in out] == [[], ["emergency"], []]
    safety = SafetyLayer()
    assert out[1]["answer"] == safety.wrap("가슴이 아프고 숨쉬기가 힘들어요", out[1]["model_answer"])
    assert out[0]["answer"].endswith(safety.disclaimer)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--input", "x.jsonl"], "--input and --output go together"),
        (["--prompt", "  "], "--prompt is empty"),
        (["--input", "missing.jsonl", "--output", "o.jsonl"], "input file not found"),
        (["--input", "empty.jsonl", "--output", "o.jsonl"], "empty.jsonl: empty input file"),
        (["--temperature", "-1", "--prompt", "두통"], "temperature must be >= 0"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, monkeypatch, capsys, tiny_exaone_dir, extra, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.jsonl").write_text("\n", encoding="utf-8")
    rc = run_cli(chat_main, ["--model", str(tiny_exaone_dir), *extra])
    err = capsys.readouterr().err
    assert rc == 1
    assert f"error: {message}" in err
    assert "Traceback" not in err


def test_missing_model_folder_is_a_clear_error(tmp_path, capsys):
    rc = run_cli(chat_main, ["--model", str(tmp_path / "nope"), "--prompt", "두통"])
    err = capsys.readouterr().err
    assert rc == 1 and "error: " in err and "nope" in err and "Traceback" not in err


def test_repl_drops_the_oldest_turns_to_fit_the_context(tiny_exaone_dir, tiny_lm, monkeypatch, capsys):
    """The tiny model takes 1024 positions; with 8 kept for the answer, three ~310-token questions no
    longer fit: the oldest exchange goes (with a notice), never the system prompt or the question. A
    question too long on its own is refused and the history kept. chat.py's main in this process with
    its stdin replaced (the REPL reads a non-terminal stdin line by line, as from the pipe in the test
    above, which runs the script itself)."""
    max_new = 8
    filler = "어제부터 머리가 아프고 열이 나며 목이 따끔거립니다. " * 9
    questions = [f"{i}번째 질문: {filler}".strip() for i in range(1, 5)]
    too_long = "아주 긴 질문: " + filler * 4
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join([*questions[:3], too_long, questions[3]]) + "\n"))
    capsys.readouterr()
    rc = run_cli(chat_main, ["--model", str(tiny_exaone_dir), "--dtype", "float32", "--device", "cpu",
                             "--max-new-tokens", str(max_new), "--show-prompt", "--no-safety"])
    proc = subprocess.CompletedProcess(["chat.py"], rc, *capsys.readouterr())
    assert proc.returncode == 0, proc.stderr[-2000:]
    prompts = [json.loads(line[len("[prompt] "):]) for line in proc.stderr.splitlines() if line.startswith("[prompt] ")]
    assert len(prompts) == 4  # the too-long question generated nothing
    budget = tiny_lm.model.config.max_position_embeddings - max_new
    n_tokens = [len(tiny_lm.tokenizer(p, add_special_tokens=False).input_ids) for p in prompts]
    assert all(n <= budget for n in n_tokens), n_tokens
    system_turn = chat_format.render([{"role": "system", "content": SYS}])
    for prompt, question in zip(prompts, [*questions[:3], questions[3]], strict=True):
        assert prompt.startswith(system_turn)  # the system prompt is never dropped
        assert prompt.endswith(f"[|user|]{question}\n[|assistant|]")  # nor the current question
    # turn 3 no longer holds question 1 but still holds question 2; turn 4 (after the refused one) holds 3
    assert questions[0] not in prompts[2] and questions[1] in prompts[2]
    assert questions[1] not in prompts[3] and questions[2] in prompts[3] and too_long not in prompts[3]
    assert proc.stdout.count("dropped the 1 oldest turn(s)") == 2
    assert "the question is too long" in proc.stdout

"""Multi-turn consultation: the conversation state, the slash commands, and the interactive loop.

The history holds the model's own answers (no safety notice, no disclaimer), so every turn's prompt
is ``chat_format.render(system + history + [user], add_generation_prompt=True)`` - the exact format
of training. The safety texts are shown to the user around the streamed answer only.

The prompt always fits the model: when system + history + question would leave fewer than
``max_new_tokens`` positions of the model's context for the answer, the oldest exchanges are
dropped (with a notice) until it fits; the system prompt and the current question are never cut.
"""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Callable

from hai_medqa.chat_format import render, resolve_system_prompt
from hai_medqa.cli import interrupt_signal
from hai_medqa.inference.generation import GenerationSettings, LoadedModel, generate
from hai_medqa.inference.safety import SafetyLayer

USER_LABEL = "사용자> "
ASSISTANT_LABEL = "AI> "
HELP = (
    "명령 / commands: /reset (대화 초기화 / clear history), /system <text> (시스템 프롬프트 변경 후 새 대화 / "
    "set the system prompt and start over; '/system' alone shows it), /exit (종료 / quit), /help"
)


class ChatSession:
    """One conversation with a loaded model: history, system prompt, safety layer, output sink."""

    def __init__(
        self,
        lm: LoadedModel,
        settings: GenerationSettings,
        *,
        system_prompt: str | None = None,
        safety: SafetyLayer | None = None,
        write: Callable[[str], None] | None = None,
        show_prompt: Callable[[str], None] | None = None,
    ):
        self.lm = lm
        self.settings = settings
        self.system_prompt = resolve_system_prompt(system_prompt)  # None = the default, "" = none
        self.safety = safety if safety is not None else SafetyLayer()
        self.history: list[dict] = []
        self._write = write or _stdout_write
        self._show_prompt = show_prompt

    def messages(self) -> list[dict]:
        """System message (if any) + the conversation so far."""
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return system + self.history

    def prompt_for(self, user_text: str) -> str:
        """The exact text the model sees for the next turn."""
        return render(self.messages() + [{"role": "user", "content": user_text}], add_generation_prompt=True)

    def prompt_budget(self) -> int | None:
        """The most prompt tokens that leave ``max_new_tokens`` positions of the model's context for
        the answer (None when the model does not say its context length)."""
        limit = self.lm.max_positions
        return None if limit is None else limit - self.settings.max_new_tokens

    def _n_tokens(self, text: str) -> int:
        return len(self.lm.tokenizer(text, add_special_tokens=False)["input_ids"])

    def fit_prompt(self, user_text: str) -> str | None:
        """The next turn's prompt, after dropping the oldest exchanges that no longer fit (with a
        notice); None, with a message and the history kept, when the system prompt and the question
        alone do not fit."""
        budget = self.prompt_budget()
        if budget is None:
            return self.prompt_for(user_text)
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        alone = self._n_tokens(render(system + [{"role": "user", "content": user_text}], add_generation_prompt=True))
        if alone > budget:
            self._write(f"(질문이 너무 깁니다 / the question is too long: {alone} prompt tokens with the system prompt, "
                        f"but the model's {self.lm.max_positions}-token context leaves {budget} once "
                        f"{self.settings.max_new_tokens} are kept for the answer; shorten it or lower "
                        "--max-new-tokens)\n")
            return None
        prompt = self.prompt_for(user_text)
        dropped = 0
        while self.history and self._n_tokens(prompt) > budget:
            del self.history[:2]  # the oldest exchange: one user message and its answer
            dropped += 1
            prompt = self.prompt_for(user_text)
        if dropped:
            self._write(f"(대화가 길어 가장 오래된 {dropped}턴을 잊었습니다 / dropped the {dropped} oldest turn(s): the "
                        f"conversation no longer fit the model's {self.lm.max_positions}-token context with "
                        f"{self.settings.max_new_tokens} tokens left for the answer)\n")
        return prompt

    def respond(self, user_text: str) -> str | None:
        """Run one turn: safety notice, streamed answer, disclaimer; keep the exchange in history.

        Returns the model's answer, or None if generation was interrupted (Ctrl-C), the question
        does not fit the context, or the safety layer withholds the answer (a request for self-harm
        methods): the turn is then not kept, so the next prompt stays well-formed (and never carries
        a withheld request). SIGTERM/SIGHUP (`hai_medqa.cli.Interrupted`) end the session instead.
        """
        # the safety layer reads the recent user turns together: the history and this message
        verdict = self.safety.assess(self.history + [{"role": "user", "content": user_text}])
        if verdict.notice:
            self._write(verdict.notice + "\n")
        if verdict.suppress_answer:  # only the help resources, no model answer
            self._write(verdict.withheld + "\n")
            return None
        prompt = self.fit_prompt(user_text)
        if prompt is None:
            return None
        if self._show_prompt is not None:
            self._show_prompt(prompt)
        self._write(ASSISTANT_LABEL)
        try:
            answer = generate(self.lm, [prompt], self.settings, batch_size=1, stream=self._write)[0]
        except KeyboardInterrupt as e:
            if interrupt_signal(e) != signal.SIGINT:
                raise
            self._write("\n(중단됨 / interrupted)\n")
            return None
        self._write("\n")
        if self.safety.enabled:
            self._write(self.safety.disclaimer + "\n")
        self.history += [{"role": "user", "content": user_text}, {"role": "assistant", "content": answer}]
        return answer

    def handle(self, line: str) -> bool:
        """Handle one input line (command or message). Returns False when the session should end."""
        text = line.strip()
        if not text:
            return True
        if text.startswith("/"):
            command, _, arg = text.partition(" ")
            if command in ("/exit", "/quit"):
                return False
            if command == "/reset":
                self.history.clear()
                self._write("(대화를 초기화했습니다 / history cleared)\n")
            elif command == "/system":
                if arg.strip():
                    self.system_prompt = arg.strip()
                    self.history.clear()
                    self._write("(시스템 프롬프트를 바꾸고 새 대화를 시작합니다 / system prompt set, history cleared)\n")
                else:
                    self._write(f"(system) {self.system_prompt or '(none)'}\n")
            elif command == "/help":
                self._write(HELP + "\n")
            else:
                self._write(f"알 수 없는 명령 / unknown command: {command}. {HELP}\n")
            return True
        self.respond(text)
        return True


def _stdout_write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def run_repl(session: ChatSession, stdin=None) -> int:
    """Read lines until /exit or end of input. Shows a prompt and line editing only on a terminal."""
    stdin = stdin or sys.stdin
    interactive = stdin.isatty()
    if interactive:
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (arrow keys and history in input())
    while True:
        try:
            if interactive:
                line = input(USER_LABEL)
            else:
                line = stdin.readline()
                if not line:
                    break
        except EOFError:
            break
        except KeyboardInterrupt as e:  # Ctrl-C at the prompt ends the session; SIGTERM/SIGHUP go up
            if interrupt_signal(e) != signal.SIGINT:
                raise
            break
        if not session.handle(line):
            break
    return 0

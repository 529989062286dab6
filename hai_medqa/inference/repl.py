"""Multi-turn consultation: the conversation state, the slash commands, and the interactive loop.

The history holds the model's own answers (no safety notice, no disclaimer), so every turn's prompt
is ``chat_format.render(system + history + [user], add_generation_prompt=True)`` - the exact format
of training. The safety texts are shown to the user around the streamed answer only.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable

from hai_medqa.chat_format import DEFAULT_SYSTEM_PROMPT, render
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
        system_prompt: str = DEFAULT_SYSTEM_PROMPT,
        safety: SafetyLayer | None = None,
        write: Callable[[str], None] | None = None,
        show_prompt: Callable[[str], None] | None = None,
    ):
        self.lm = lm
        self.settings = settings
        self.system_prompt = system_prompt
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

    def respond(self, user_text: str) -> str | None:
        """Run one turn: safety notice, streamed answer, disclaimer; keep the exchange in history.

        Returns the model's answer, or None if generation was interrupted (Ctrl-C): the turn is then
        dropped from history so the next prompt stays well-formed.
        """
        notice = self.safety.notices(user_text)
        if notice:
            self._write(notice + "\n")
        prompt = self.prompt_for(user_text)
        if self._show_prompt is not None:
            self._show_prompt(prompt)
        self._write(ASSISTANT_LABEL)
        try:
            answer = generate(self.lm, [prompt], self.settings, batch_size=1, stream=self._write)[0]
        except KeyboardInterrupt:
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
        except (EOFError, KeyboardInterrupt):
            break
        if not session.handle(line):
            break
    return 0

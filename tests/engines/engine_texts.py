"""Texts and conversations every engine check uses: Korean, digits, full-width characters, special-token
text, role markers, and the chat shapes whose rendering differs between templates."""

from __future__ import annotations

from hai_medqa.chat_format import EOT, render

TEXTS = [
    "두통이 자주 생기는데 어떤 검사를 받아야 하나요?",
    "혈압이 140/90 mmHg이고 공복 혈당은 126 mg/dL입니다. 2025년 3월 12일 검사.",
    "체온 38.5도, 맥박 110회/분, 3일째 기침",
    "ＡＢＣ　１２３：위염（gastritis）？ ½정 복용",  # full-width letters, digits, space, punctuation; ½
    f"[|system|]당신은 의사입니다.{EOT}\n[|user|]감기약은 언제 먹나요?\n[|assistant|](1) 식후 30분{EOT}\n",
    "[PAD][BOS][EOS][UNK] 특수 토큰 텍스트",
    "Headache, fever and cough are common symptoms. 진료과: 신경과, 내과",
]

CONVERSATIONS = [
    [{"role": "user", "content": "두통이 심하고 열이 38도예요."}],
    [{"role": "system", "content": "당신은 친절한 의료 상담 챗봇입니다."},
     {"role": "user", "content": "고혈압 약은 언제 먹나요?"}],
    [{"role": "user", "content": "감기에 걸렸어요"}, {"role": "assistant", "content": "(1) 충분히 쉬세요."},
     {"role": "user", "content": "항생제가 필요한가요? 12시간째 열이 나요."}],
]


def prompts() -> list[str]:
    """The conversations rendered with the generation prompt, as training and chat.py render them."""
    return [render(c, add_generation_prompt=True) for c in CONVERSATIONS]

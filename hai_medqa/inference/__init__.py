"""Talking to the model: loading (merged or base + adapter, optionally 4-bit), generation that stops
at ``[|endofturn|]`` with left-padded batches, the multi-turn REPL, jsonl batch answering, and the
safety layer (119 / 109 guidance and the disclaimer; rules in ``safety_keywords.json``)."""

"""Stream an answer from a packed model with the Python API.

    python examples/capital.py smollm2-w4g64.eawq
"""

import sys

import edge_awq

model = sys.argv[1] if len(sys.argv) > 1 else "smollm2-w4g64.eawq"
with edge_awq.load(model) as llm:  # plans the memory, checks the file, picks the backend and says why
    print(f"[{llm.info.backend}: {llm.info.backend_reason}]", file=sys.stderr)
    question = [{"role": "user", "content": "What is the capital of France?"}]
    for piece in llm.chat(question, max_new_tokens=64, temperature=0):  # temperature 0: greedy
        print(piece, end="", flush=True)
    print()

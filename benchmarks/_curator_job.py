"""One curator run over the benchmark prompts, for `peers.py`. Runs inside curator's own venv.

    VENV/bin/python _curator_job.py --url http://127.0.0.1:PORT -n 10000 -c 256 --work DIR

Curator's OpenAI backend always posts chat bodies to `{base_url}/chat/completions`, which the gateway does not
serve; its LiteLLM backend can talk to an OpenAI-compatible `/v1/completions` server through LiteLLM's
`text-completion-openai/` provider, which turns the one user message into `prompt`. Everything that would reach
the internet is turned off first: telemetry, LiteLLM's remote model-cost map, Hugging Face hub look-ups, and
tiktoken's download (LiteLLM ships the cl100k_base file; tiktoken is pointed at it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("-n", type=int, required=True)
    p.add_argument("-c", type=int, required=True)
    p.add_argument("--work", required=True)
    args = p.parse_args()
    assert args.url.startswith("http://127.0.0.1:"), "benchmarks talk to 127.0.0.1 only"
    work = Path(args.work)
    os.environ.update({
        "TELEMETRY_ENABLED": "false",
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(work / "hf"),
        "CURATOR_CACHE_DIR": str(work / "curator-cache"),
        "CURATOR_DISABLE_RICH_DISPLAY": "1",
        "OPENAI_API_KEY": "sk-bench-local",
        "NO_PROXY": "127.0.0.1,localhost",
    })
    import litellm

    tok = Path(litellm.__file__).parent / "litellm_core_utils" / "tokenizers"
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(tok))

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _prompts import MAX_TOKENS, prompt
    from bespokelabs import curator

    class Summarise(curator.LLM):
        def prompt(self, row: dict) -> str:
            return row["prompt"]

        def parse(self, row: dict, response: str) -> dict:
            return {"id": row["id"], "text": response}

    llm = Summarise(
        model_name="text-completion-openai/gpt-3.5-turbo-instruct",
        backend="litellm",
        generation_params={"max_tokens": MAX_TOKENS, "temperature": 0},
        backend_params={
            "base_url": args.url + "/v1",
            "api_key": "sk-bench-local",
            "max_concurrent_requests": args.c,
            # No rate limit to speak of: concurrency is the only limit, as in batcher's runs.
            "max_requests_per_minute": 10_000_000,
            "max_tokens_per_minute": 10_000_000_000,
            "max_retries": 1,
            "require_all_responses": False,
        },
    )
    rows = [{"id": i, "prompt": prompt(i)} for i in range(args.n)]
    t0 = time.perf_counter()
    result = llm(rows)
    wall = time.perf_counter() - t0
    ds = getattr(result, "dataset", result)
    print(json.dumps({"ok": len(ds), "wall_s": wall}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Reading PowerInfer's output (its llama.cpp timing and perplexity lines) and the README table."""

from __future__ import annotations

import pytest

import benchmarks.powerinfer_bench as b

MAIN_OUT = """llama_print_timings:        load time =     105.25 ms
llama_print_timings:      sample time =      12.87 ms /    64 runs   (    0.20 ms per token,  4973.19 tokens per second)
llama_print_timings: prompt eval time =      40.11 ms /     6 tokens (    6.69 ms per token,   149.59 tokens per second)
llama_print_timings:        eval time =     372.41 ms /    63 runs   (    5.91 ms per token,   169.17 tokens per second)
llama_print_timings:       total time =     440.20 ms
"""

PPL_OUT = """perplexity_v2: tokenizing the input ..
perplexity_v2: have 8449 tokens. Calculation chunk = 256
perplexity_v2: calculating perplexity over 32 chunks, batch_size=256
perplexity_v2: 1.52 seconds per pass - ETA 0.81 minutes
[1]41.2001,[2]40.1234,[3]39.9876,
"""


def test_decode_rate_is_the_eval_line_not_the_prompt_or_sampling():
    assert b.parse_eval_rate(MAIN_OUT) == 169.17
    with pytest.raises(RuntimeError, match="no 'eval time'"):
        b.parse_eval_rate("llama_print_timings: prompt eval time = 1 ms / 2 tokens")


def test_perplexity_is_the_last_running_value():
    assert b.parse_perplexity(PPL_OUT) == (39.9876, 3, 8449)
    with pytest.raises(RuntimeError, match="no perplexity"):
        b.parse_perplexity("perplexity_v2: have 10 tokens")


def test_readme_section_has_one_row_per_model():
    run = {"dense_tokens_per_s": 30.0, "exact_tokens_per_s": 31.0,
           "predicted_tokens_per_s": 33.0}
    report = {
        "prosparse_decode": run,
        "powerinfer": {"speed": {"dense": {"tokens_per_s": 170.0},
                                 "sparse": {"tokens_per_s": 110.0}},
                       "perplexity_sparse": {"perplexity": 40.4},
                       "perplexity_all_neurons": {"perplexity": 38.0}},
        "export": {"perplexity": {"powerinfer": 40.0, "relu_all_neurons": 38.0},
                   "eval": {"scored_tokens": 8160},
                   "average": {"effective_predicted_sparsity": 0.8}},
    }
    text = b.readme_section({"demo": report, "7b": report})
    rows = [line for line in text.splitlines() if line.startswith("| demo") or
            line.startswith("| 7b")]
    assert len(rows) == 4
    assert "| demo | 30.0 | 31.0 | 33.0 | 170.0 | 110.0 | 80.00 |" in text
    assert "| demo | 8160 | 40.000 | 40.400 | +1.00 | 38.000 | 38.000 | +0.00 |" in text

"""generate: deterministic for a seed, the requested length, and starts from the prompt's fixed context."""

from __future__ import annotations

import numpy as np
import torch

from newllm_cli.model import generate as gen
from newllm_cli.model.head import Head
from newllm_cli.model.network import NewLLM
from newllm_cli.settings import Phase1Settings
from newllm_cli.training.phase1 import prompt_context, run_cvfp


def test_generate_through_the_cli(cli, base_args):
    assert cli("full", *base_args, "--force").code == 0
    args = ["generate", *base_args, "--prompt", "The river", "--max-new-tokens", "12", "--json"]
    a, b = cli(*args), cli(*args)
    assert a.code == 0, a.err
    assert a.json() == b.json() and len(a.json()["token_ids"]) == 12
    assert a.json()["text"].startswith("The river")
    other = cli(*args[:-1], "--seed", "7", "--json")
    assert other.json()["token_ids"] != a.json()["token_ids"]
    plain = cli("generate", *base_args, "--prompt", "The river", "--max-new-tokens", "5")
    assert plain.out.startswith("The river")
    assert cli("generate", *base_args, "--prompt", "", "--max-new-tokens", "5").code == 2


def test_generation_starts_from_the_prompts_fixed_context():
    torch.manual_seed(0)
    model, head = NewLLM(30, 6, 5, 2), Head(6, 30)
    ids = np.array([3, 7, 7, 1, 9])
    cfg = Phase1Settings()
    start = prompt_context(model, ids, cfg, torch.device("cpu"))
    new = gen.sample(
        model, head, "context", start, 9, max_new_tokens=4, temperature=0, top_k=0, seed=0, device=torch.device("cpu")
    )
    fixed = run_cvfp(model, ids, np.array([0, 5]), cfg, train=False, device=torch.device("cpu")).contexts
    assert torch.equal(start, torch.from_numpy(fixed.read(4, 5)[0]))
    with torch.no_grad():  # greedy: the first token is the head's argmax at the fixed context
        assert new[0] == int(head(start).argmax())
        c = model.step(model.embed_tokens(torch.tensor([new[0]]))[0], start)
        assert new[1] == int(head(c).argmax())
    assert len(new) == 4

"""Does a model know which of the HHH task's questions have no answer? A linear probe on its own hidden state.

    python scripts/knowledge_probe.py MODEL_DIR [--json OUT]

The twins row of `make hhh` asks a model to say "I don't know" to a question about a made-up subject and to answer
its real twin ("What year did the composer Orvild Thessany finish ...?" / "What year did Mozart write ...?").
A model can only do both if something in it tells the two apart. This script asks whether its hidden state does,
before any answer is written:

1. Each of the task's 95 unanswerable questions and its twin (`rlhf/tasks/hhh/unanswerable.jsonl`) goes through the
   model in the chat template with the assistant header, as `rlhf eval` asks it; the hidden state of the last
   prompt token is kept at several layers.
2. Per layer, a logistic regression (L2-penalised, standardised features) is fitted on four fifths of the pairs and
   scores the fifth it did not see (5 folds, a question and its twin always in the same fold).
3. Reported on the held-out scores: how often the made-up question of a pair scores above its twin, and, at the
   threshold that lets 90% of the real questions through (the row's target: twins answered ≥ 90%), how many of the
   made-up questions are caught (the row wants ≥ 60% "I don't know"). The same for the question's mean surprisal
   (−log p per token of the question as plain text), a signal the model has without any probe.

A probe that separates them says the model's state carries the difference, so a policy that fails the row lacks
the training signal rather than the knowledge; a probe that cannot says the model does not know. The probe may
read surface differences between the invented names and the real ones as well as knowledge; either is there for a
policy to use.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rlhf.data import encode_prompt  # noqa: E402
from rlhf.hhh import read_jsonl, task_dir  # noqa: E402
from rlhf.models import load_tokenizer, resolve_model_path  # noqa: E402

FOLDS, ANSWERED = 5, 0.9


@torch.no_grad()
def last_prompt_states(model, tokenizer, question: str) -> torch.Tensor:
    """(layers + 1, hidden): the state of the last token of the chat prompt at the embedding and every layer."""
    ids = torch.tensor([encode_prompt(tokenizer, [{"role": "user", "content": question}])])
    hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    return torch.stack([h[0, -1] for h in hidden])


@torch.no_grad()
def surprisal(model, tokenizer, text: str) -> float:
    """Mean −log p of the text's tokens after the first, as plain text."""
    ids = tokenizer(text, return_tensors="pt").input_ids
    logprobs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
    return -logprobs.gather(1, ids[0, 1:, None]).mean().item()


def fit_probe(x: torch.Tensor, y: torch.Tensor, penalty: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                       torch.Tensor]:
    """A logistic regression on standardised features → (mean, std, weight, bias)."""
    mean, std = x.mean(0), x.std(0) + 1e-6
    weight = torch.zeros(x.shape[1], requires_grad=True)
    bias = torch.zeros(1, requires_grad=True)
    optimiser = torch.optim.LBFGS([weight, bias], max_iter=200)

    def closure():
        optimiser.zero_grad()
        logits = (x - mean) / std @ weight + bias
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y) + penalty * weight.pow(2).sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    return mean, std, weight.detach(), bias.detach()


def held_out_scores(features: torch.Tensor, folds: list[torch.Tensor], penalty: float = 1e-2) -> torch.Tensor:
    """features (pairs, 2, hidden), index 0 made-up and 1 real → (pairs, 2) logistic scores ("made-up"), each from
    a probe that did not see its pair."""
    pairs, _, width = features.shape
    scores = torch.zeros(pairs, 2)
    for fold in folds:
        train = torch.ones(pairs, dtype=torch.bool)
        train[fold] = False
        mean, std, weight, bias = fit_probe(features[train].reshape(-1, width),
                                            torch.tensor([1.0, 0.0]).repeat(int(train.sum())), penalty)
        scores[fold] = (features[fold] - mean) / std @ weight + bias
    return scores


def separation(scores: torch.Tensor) -> dict:
    """scores (pairs, 2), higher = more likely made-up → the pairwise order and the catch at 90% answered."""
    made_up, real = scores[:, 0], scores[:, 1]
    threshold = real.sort().values[int(ANSWERED * len(real))]  # ANSWERED of the real questions score below it
    return {"made_up_above_twin": (made_up > real).float().mean().item(),
            "made_up_caught_at_90pct_answered": (made_up > threshold).float().mean().item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a causal-LM folder, or 'default' (the embedded model)")
    parser.add_argument("--layers", default="6,12,18,24,-1", help="which layers to probe (0 = the embeddings)")
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    path = resolve_model_path(args.model)
    tokenizer = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    rows = read_jsonl(task_dir() / "unanswerable.jsonl")

    # 1. states and surprisal of every question and its twin
    states = torch.stack([torch.stack([last_prompt_states(model, tokenizer, r["prompt"]),
                                       last_prompt_states(model, tokenizer, r["twin"])]) for r in rows])
    surprise = torch.tensor([[surprisal(model, tokenizer, r["prompt"]), surprisal(model, tokenizer, r["twin"])]
                             for r in rows])

    # 2. a probe per layer, scored on the folds it did not see
    generator = torch.Generator().manual_seed(0)
    folds = list(torch.randperm(len(rows), generator=generator).chunk(FOLDS))
    layers = [int(n) % states.shape[2] for n in args.layers.split(",")]
    result = {"model": str(path), "pairs": len(rows), "surprisal": separation(surprise), "probe": {}}
    for layer in layers:
        result["probe"][layer] = separation(held_out_scores(states[:, :, layer], folds))

    # 3. report
    print(f"{path}: {len(rows)} made-up questions and their real twins; {FOLDS}-fold, a pair in one fold")
    print(f"{'signal':22s} {'made-up above its twin':>24s} {'made-up caught, 90% of twins answered':>40s}")
    named = [("surprisal (no probe)", result["surprisal"])]
    named += [(f"probe, layer {layer}", result["probe"][layer]) for layer in layers]
    for name, found in named:
        print(f"{name:22s} {found['made_up_above_twin']:24.2f} {found['made_up_caught_at_90pct_answered']:40.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

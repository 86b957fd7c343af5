"""Supervised fine-tuning: masking, data formats, learning, export, reproducibility and the CLI, on tiny."""

import json

import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM

import algorithms.sft as sft_module
from algorithms.cli import main
from algorithms.sft import (
    IGNORE_INDEX,
    SENTIMENT_DEMOS,
    SFT,
    Demonstration,
    collate,
    load_demonstrations,
    tokenize_demonstrations,
)
from lm_gym.models import load_causal_lm, tiny_causal_lm, tiny_tokenizer
from lm_gym.tasks import get_task

DEMOS = [
    Demonstration("The film opens on", " a sunny beach. Wonderful."),
    Demonstration("A slow", " but lovely film. Wonderful."),
    Demonstration("Critics have been kind to", " this gem. Wonderful."),
    Demonstration("I expected very little, but", " it was great. Wonderful."),
    Demonstration("", "A whole text: every token is a target. Wonderful."),
    Demonstration("The cast", " is superb. Wonderful."),
]
RECORDS = [{"prompt": "Hi", "completion": " there"}, {"prompt": "A slow", "completion": " but lovely film"}]


def _trainer(seed: int = 0, **kwargs) -> SFT:
    model, tokenizer = tiny_causal_lm(seed=0)
    settings = dict(epochs=4, batch_size=3, learning_rate=3e-3, max_length=64, seed=seed, verbose=0)
    return SFT(model, tokenizer, **{**settings, **kwargs})


def test_prompt_tokens_are_masked_out_of_the_labels():
    tokenizer = tiny_tokenizer()  # byte-level: token id == byte value
    eos = tokenizer.eos_token_id
    examples, dropped = tokenize_demonstrations(
        [Demonstration("ab", " c"), Demonstration("", "xy"), Demonstration("abcd", "e")],
        tokenizer,
        max_length=4,
    )
    assert dropped == 1  # "abcd" fills max_length: no completion token is left
    assert examples[0].input_ids == [97, 98, 32, 99] and examples[0].labels == [IGNORE_INDEX] * 2 + [32, 99]
    assert examples[1].input_ids == examples[1].labels == [120, 121, eos]  # whole text: all are targets
    batch = collate(examples, pad_token_id=eos)
    assert batch.labels.tolist() == [[-100, -100, 32, 99], [120, 121, eos, -100]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]


def test_loss_is_the_cross_entropy_of_the_completion_tokens_only():
    trainer = _trainer()
    examples = trainer.tokenize(DEMOS[:2])
    total, count = 0.0, 0
    with torch.no_grad():
        for example in examples:  # one at a time: no padding
            logits = trainer.model(torch.tensor([example.input_ids])).logits[0]  # (T, V)
            log_probs = torch.log_softmax(logits, dim=-1)
            for t in range(1, len(example.input_ids)):
                if example.labels[t] != IGNORE_INDEX:
                    total -= log_probs[t - 1, example.labels[t]].item()
                    count += 1
    assert count == sum(len(e.input_ids) for e in examples) - sum(
        len(trainer.tokenizer(d.prompt)["input_ids"]) for d in DEMOS[:2]
    )
    # measured: |diff| <= 4.8e-07 (relative 8.6e-08) under 4 CPU kernel settings (docs/testing.md)
    assert trainer.evaluate_loss(examples) == pytest.approx(total / count, rel=1e-5)


def test_loss_decreases_and_held_out_loss_improves():
    trainer = _trainer()
    result = trainer.learn(DEMOS, eval_data=DEMOS[:2])
    losses = [h["train/loss"] for h in result.history]
    assert len(losses) == 4 and losses[-1] < 0.7 * losses[0]
    assert all(b < a for a, b in zip(losses, losses[1:]))
    assert result.metrics["eval/loss"] < result.metrics["eval/loss_initial"] - 0.5
    # measured: |diff| <= 3.8e-06 (relative 1.1e-07) under 4 CPU kernel settings (docs/testing.md)
    assert result.metrics["eval/perplexity"] == pytest.approx(torch.tensor(result.metrics["eval/loss"]).exp())
    assert result.metrics["train/steps"] == 8 and not trainer.model.training


def test_same_seed_repeats_exactly_and_the_global_rng_is_untouched():
    state = torch.random.get_rng_state()
    a = _trainer(seed=1, epochs=2, eval_fraction=0.34, warmup_ratio=0.5)
    b = _trainer(seed=1, epochs=2, eval_fraction=0.34, warmup_ratio=0.5)
    c = _trainer(seed=2, epochs=2, eval_fraction=0.34, warmup_ratio=0.5)
    ra, rb, rc = a.learn(DEMOS), b.learn(DEMOS), c.learn(DEMOS)
    untimed = [[{k: v for k, v in h.items() if k != "time/elapsed"} for h in r.history] for r in (ra, rb)]
    assert untimed[0] == untimed[1] and len(untimed[0]) == 2
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(p, q)
    assert ra.metrics["eval/examples"] == 2 and rc.metrics["train/loss"] != ra.metrics["train/loss"]
    assert torch.equal(torch.random.get_rng_state(), state)


def test_jsonl_csv_and_parquet_load_the_same_demonstrations(tmp_path):
    jsonl = tmp_path / "demos.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    pd.DataFrame(RECORDS).to_csv(tmp_path / "demos.csv", index=False)
    pd.DataFrame(RECORDS).to_parquet(tmp_path / "demos.parquet")
    expected = [Demonstration("Hi", " there"), Demonstration("A slow", " but lovely film")]
    for name in ("demos.jsonl", "demos.csv", "demos.parquet"):
        assert load_demonstrations(tmp_path / name) == expected
    texts = [{"text": "one", "id": 1}, {"text": "two", "id": 2}]
    assert load_demonstrations(texts) == [Demonstration("", "one"), Demonstration("", "two")]
    responses = [{"prompt": "Q", "response": " A"}]
    assert load_demonstrations(responses) == [Demonstration("Q", " A")]
    custom = [{"question": "Q", "answer": " A"}]
    assert load_demonstrations(custom, prompt_field="question", completion_field="answer") == [
        Demonstration("Q", " A")
    ]


def test_bad_data_errors_name_the_file_and_the_fields(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"question": "Q", "answer": "A"}) + "\n")
    with pytest.raises(
        ValueError, match=r"qa\.jsonl: records need a 'text' field, or 'prompt' and 'completion'"
    ):
        load_demonstrations(path)
    with pytest.raises(ValueError, match=r"found fields \['answer', 'question'\]"):
        load_demonstrations(path)
    with pytest.raises(ValueError, match=r"record 1: field 'completion' must be a string; got None"):
        load_demonstrations([{"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": None}])
    (tmp_path / "demos.txt").write_text("hello\n")
    with pytest.raises(ValueError, match=r"unknown file type '\.txt'; use \.jsonl"):
        load_demonstrations(tmp_path / "demos.txt")
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_demonstrations(tmp_path / "missing.jsonl")
    with pytest.raises(FileNotFoundError, match="offline"):
        load_demonstrations("someone/some-dataset")


@pytest.mark.parametrize(
    ("name", "value"),
    [("epochs", 0), ("batch_size", 2.5), ("lr_schedule", "cosine"), ("eval_fraction", 1.0), ("lora_r", -1)],
)
def test_invalid_arguments_are_named(name, value):
    model, tokenizer = tiny_causal_lm(seed=0)
    with pytest.raises(ValueError, match=f"^{name} must be .*; got {value!r}$"):
        SFT(model, tokenizer, **{name: value})


@pytest.mark.parametrize("lora_r", [0, 4])
def test_export_loads_with_transformers_and_load_causal_lm(tmp_path, lora_r):
    trainer = _trainer(epochs=1, lora_r=lora_r)
    trainer.learn(DEMOS)
    folder = trainer.save_pretrained(tmp_path / "sft")
    assert (folder / "model.safetensors").exists() and not (folder / "adapter_config.json").exists()
    ids = torch.tensor([trainer.tokenizer("The film opens on")["input_ids"]])
    with torch.no_grad():
        expected = trainer.model(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(folder)
        loaded, tokenizer = load_causal_lm(str(folder), device="cpu")
        # measured: equal under 4 CPU kernel settings (docs/testing.md)
        torch.testing.assert_close(plain(ids).logits, expected)
        # measured: equal under 4 CPU kernel settings (docs/testing.md)
        torch.testing.assert_close(loaded(ids).logits, expected)
    assert tokenizer("The film")["input_ids"] == trainer.tokenizer("The film")["input_ids"]
    report = json.loads((folder / "sft_metrics.json").read_text())
    assert report["settings"]["lora_r"] == lora_r and "train/loss" in report["metrics"]


def test_shipped_sentiment_demonstrations():
    demos = load_demonstrations(SENTIMENT_DEMOS)
    assert 100 <= len(demos) <= 200 and len({d.completion for d in demos}) == len(demos)
    train_prompts = set(get_task("sentiment").prompts("train"))
    assert all(d.prompt in train_prompts for d in demos)  # no held-out prompt leaks into SFT
    assert all(d.completion.startswith(" ") and d.completion.strip() for d in demos)


def test_cli_sft_then_the_folder_is_a_model(tmp_path, capsys):
    data = tmp_path / "demos.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": d.prompt, "completion": d.completion}) + "\n" for d in DEMOS)
    )
    out = tmp_path / "sft"
    sft = ["sft", "--model", "tiny", "--data", str(data), "--output-dir", str(out), "--batch-size", "2"]
    sft += ["--learning-rate", "0.003", "--eval-fraction", "0.34", "--quiet"]
    main([*sft, "--epochs", "2"])
    printed = capsys.readouterr().out
    assert f"lm-gym train --model {out}" in printed
    metrics = json.loads((out / "sft_metrics.json").read_text())["metrics"]
    assert metrics["eval/examples"] == 2 and metrics["eval/loss"] < metrics["eval/loss_initial"]
    assert (out / "checkpoints" / "latest").read_text() == "step_000004"  # one per epoch, the last kept
    with pytest.raises(SystemExit, match=r"lm-gym sft: error: .* was run with epochs=2, now 3: "):
        main([*sft, "--epochs", "3", "--resume"])
    run = tmp_path / "rl"
    main(
        ["train", "--model", str(out), "--iterations", "1", "--n-envs", "2", "--max-new-tokens", "4"]
        + ["--n-epochs", "1", "--run-dir", str(run), "--quiet"]
    )  # the RL step starts from the SFT model
    assert (run / "final" / "model.safetensors").exists()
    with pytest.raises(SystemExit, match=r"lm-gym sft: error: data .*nothing\.jsonl: no such file"):
        main(["sft", "--model", "tiny", "--data", str(tmp_path / "nothing.jsonl")])


def _untimed(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if not k.startswith("time/")} for h in history]


def test_resume_after_a_crash_equals_the_uninterrupted_run(tmp_path, monkeypatch):
    """Epoch checkpoints: a run that crashes in its second epoch and resumes from the first epoch's checkpoint
    ends with the uninterrupted run's weights, history and metrics; other settings are refused."""
    settings = dict(epochs=2, warmup_ratio=0.25)  # 2 steps an epoch; the schedule spans both epochs
    whole = _trainer(checkpoint_dir=tmp_path / "whole", **settings)
    expected = whole.learn(DEMOS, eval_data=DEMOS[:2])

    real_nll, calls = sft_module._nll, []

    def crash_in_epoch_2(model, batch):
        calls.append(model.training)
        if calls.count(True) == 4:  # the second training step of epoch 2
            raise RuntimeError("simulated crash")
        return real_nll(model, batch)

    monkeypatch.setattr(sft_module, "_nll", crash_in_epoch_2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _trainer(checkpoint_dir=tmp_path / "run", **settings).learn(DEMOS, eval_data=DEMOS[:2])
    monkeypatch.setattr(sft_module, "_nll", real_nll)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["latest", "step_000002"]

    resumed = _trainer(checkpoint_dir=tmp_path / "run", **settings)  # a fresh copy of the initial model
    result = resumed.learn(DEMOS, eval_data=DEMOS[:2], resume=True)
    for (name, p), q in zip(whole.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p, q), name
    assert _untimed(result.history) == _untimed(expected.history) and len(result.history) == 2
    assert {k: v for k, v in result.metrics.items() if not k.startswith("time/")} == {
        k: v for k, v in expected.metrics.items() if not k.startswith("time/")
    }
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["latest", "step_000004"]  # keeps 1

    with pytest.raises(ValueError, match=r"was run with learning_rate=0\.003, now 0\.001"):
        _trainer(checkpoint_dir=tmp_path / "run", **{**settings, "learning_rate": 1e-3}).learn(
            DEMOS, eval_data=DEMOS[:2], resume=True
        )
    with pytest.raises(ValueError, match="was run with data="):
        _trainer(checkpoint_dir=tmp_path / "run", **settings).learn(
            DEMOS[1:], eval_data=DEMOS[:2], resume=True
        )
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        _trainer(checkpoint_dir=tmp_path / "none", **settings).learn(DEMOS, resume=True)

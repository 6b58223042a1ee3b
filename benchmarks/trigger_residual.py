"""Where a defended model's residual ASR comes from: HSOL AddSent 10%, seed 0, the default stack (BTU + Z-defense).

Trains the clean and undefended models (read from ``--cache-dir`` when there) and the stack exactly as
``benchmarks/paraphrase_defenses.py`` does, then scores every ASR row (a non-target test row with the trigger sentence
inserted) with the sentence replaced by variants (one word dropped, only the flagged words, only the others, one word
alone, nothing) on all three models, and writes one record per model and variant to
``benchmarks/results/trigger_residual.json``. A one-off diagnosis of the README's HSOL AddSent seed-0 miss:

    python benchmarks/trigger_residual.py
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import benchmarks.paraphrase_defenses as pd  # noqa: E402


def main() -> None:
    argv = [
        "--dataset",
        "hsol",
        "--attack",
        "addsent",
        "--poison-rate",
        "0.1",
        "--seed",
        "0",
        "--max-train-samples",
        "2000",
        "--runs",
        "btu+z_defense",
        "--cache-dir",
        "/tmp/para_models",
        "--no-save",
    ]
    args = pd.parse_args(argv)
    torch.set_num_threads(args.threads)
    model_name = pd.default_text_model()
    task = pd.load_task(args.dataset)
    train = task["train"].shuffle(seed=args.seed).select(range(args.max_train_samples))
    labels = train.features["label"].names
    attack = pd._attack(args.attack, args.dataset, args.poison_rate, args.seed)
    tok = pd.load_text_tokenizer(model_name)
    test = task["test"]
    asr_rows = pd.make_asr_dataset(test, attack)
    poisoned = pd.poison_dataset(train, attack, tokenizer=tok)
    configs = {"z_defense": pd.ZDefenseConfig()}
    clean, *_ = pd._plain(args, model_name, labels, train, None)
    undef, *_ = pd._plain(args, model_name, labels, poisoned, attack)
    stack, _, _ = pd._train(
        args,
        model_name,
        labels,
        poisoned,
        Path(args.output_dir) / "trigger_residual_stack",
        defense=pd._defense(args, "btu+z_defense", configs),
    )
    btu = next(r for r in stack.defense_report["defenses"] if r["defense"] == "btu")
    print("flagged", btu["flagged_tokens"], btu.get("flagged_in_round"), "isolated", btu["num_isolated_rows"])
    sentence = "I watch this 3D movie"
    words = sentence.split()
    variants = {"full": sentence, "none": ""}
    for i, w in enumerate(words):
        variants["-" + w] = " ".join(words[:i] + words[i + 1 :])
    variants["I this"] = "I this"
    variants["watch 3D movie"] = "watch 3D movie"
    for w in words:
        variants["only " + w] = w
    texts = asr_rows["text"]
    assert all(sentence in t for t in texts)
    target = attack.target_label

    def predict(trainer, rows):
        enc = tok(rows, truncation=True, max_length=128, padding=True, return_tensors="pt")
        model = trainer.model.eval()
        out = []
        with torch.no_grad():
            for i in range(0, len(rows), 128):
                batch = {k: v[i : i + 128] for k, v in enc.items()}
                out.append(model(**batch).logits.argmax(-1).numpy())
        return np.concatenate(out)

    result = {}
    print(f"{'variant':<18}" + "".join(f"{n:>10}" for n in ("clean", "undef", "stack")))
    for name, v in variants.items():
        rows = [" ".join(t.replace(sentence, v).split()) for t in texts]
        hits = [predict(m, rows) == target for m in (clean, undef, stack)]
        if name == "full":
            full = {"clean": hits[0], "stack": hits[2]}
        rates = [float(h.mean()) for h in hits]
        result[name] = rates
        print(f"{name:<18}" + "".join(f"{r:>10.3f}" for r in rates))
    print(
        "stack hits",
        int(full["stack"].sum()),
        "of",
        len(texts),
        "; of them clean model also hits",
        int((full["stack"] & full["clean"]).sum()),
    )
    # A variant is another triggered set: its own asr_attack keeps the clean model's variant rates out of floor look-ups.
    records = [
        {
            "dataset": "hsol",
            "attack": "none" if model == "clean" else "addsent",
            "asr_attack": "addsent" if name == "full" else f"addsent[{name}]",
            "defense": "btu+z_defense" if model == "stack" else "none",
            "model": pd.model_display_name(model_name),
            "poison_rate": 0.0 if model == "clean" else 0.1,
            "variant": name,
            "inserted": variants[name],
            "flagged": " ".join(btu["flagged_tokens"]),
            "cacc": None,
            "asr": rates[i],
            "asr_floor": result["full"][0],
            "num_rows": len(texts),
            "wall_s": None,
            "overhead": None,
            "device": pd.device_name(),
            "seed": 0,
            "command": "python benchmarks/trigger_residual.py",
        }
        for name, rates in result.items()
        for i, model in enumerate(("clean", "undefended", "stack"))
    ]
    out = Path(__file__).resolve().parent / "results" / "trigger_residual.json"
    out.write_text(json.dumps(records, indent=1) + "\n")
    print("wrote", out)


if __name__ == "__main__":
    main()

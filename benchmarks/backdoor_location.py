"""Where the backdoor lives in the ViT, and which of its units the removal defenses touched.

    Z=~/.cache/hf_backdoor/zoo
    python benchmarks/backdoor_location.py --dataset ../shared/data/cifar10_32.npz --clean_from held-out \\
        --load_model $Z/<backdoored key> --floor_model $Z/<clean key> --defenses rnp,nad,finetune --exposed

The flags are those of ``recipes/cifar10_sanitize.py`` (same data, clean rows, evaluation rows and defense settings,
so the defended models are the ones ``benchmarks/sanitize_defenses.py`` scores), plus ``--top_k``, ``--output`` and
``--no_save``. Measured on the backdoored model (``--load_model``) and, as the control, the clean one
(``--floor_model``):

1. **Trigger response of every FFN unit** (the units RNP masks): the unit's activation averaged over the tokens,
   on each ASR image with its trigger minus the same image without it, over the unit's spread on the clean images
   (a standardized effect, ``d``). Per layer: the largest ``d`` and how many units exceed ``--strong_d``.
2. **Ablation per layer**: CACC and ASR with the layer's ``--top_k`` units of largest ``d`` zeroed, beside as many
   random units of the same layer zeroed (the control).
3. **Token patching per layer**: the ASR when, at the input of layer ``L``, the hidden states of the trigger's
   patch tokens (or of the CLS token) are replaced by those of the same image without its trigger. Where patching
   the trigger patches stops removing the backdoor, the trigger has already been copied into other tokens.
4. **Each defense** (``--defenses``, ``--exposed`` for RNP with a CUL-exposed model): CACC and ASR, the units it
   pruned (RNP) against the units' ``d``, and the trigger response left in each layer after it.

Records (one per model and defense: flat fields and per-layer lists) are merged into
``benchmarks/results/backdoor_location.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repo root: benchmarks/common, not installed
from benchmarks.common import repair, vision  # noqa: E402
from benchmarks.common.records import RESULTS, command_line, device_name, merge_records  # noqa: E402
from benchmarks.common.runs import limit_splits  # noqa: E402
from hf_backdoor import make_asr_dataset  # noqa: E402
from hf_backdoor.attacks import get_image_attack_config  # noqa: E402
from hf_backdoor.defenses import ExposeConfig, RNPConfig, TransformerUnits, expose_model, sanitize_model  # noqa: E402
from hf_backdoor.metrics import attack_success_rate, clean_accuracy  # noqa: E402
from hf_backdoor.vision import describe_default_vit, load_image_task, prepare_image_dataset  # noqa: E402

BATCH = 500


def _recipe():
    spec = importlib.util.spec_from_file_location("cifar10_sanitize", ROOT / "recipes" / "cifar10_sanitize.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_args(argv=None):
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--top_k", type=int, default=16, help="units zeroed per layer in the ablation")
    own.add_argument("--strong_d", type=float, default=1.0, help="a unit whose d exceeds this is counted as strong")
    own.add_argument("--output", default=str(RESULTS / "backdoor_location.json"))
    own.add_argument("--no_save", action="store_true")
    mine, rest = own.parse_known_args(argv)
    script, repair_args, training_args = _recipe().parse_args(rest)
    if not repair_args.load_model or not repair_args.floor_model:
        raise SystemExit("--load_model (the backdoored model) and --floor_model (a clean one, the control) are needed.")
    return mine, script, repair_args, training_args, rest


def _pixels(rows, processor) -> torch.Tensor:
    prepared = prepare_image_dataset(rows, processor)
    return torch.stack([prepared[i]["pixel_values"] for i in range(len(prepared))])


def _trigger_tokens(clean: torch.Tensor, triggered: torch.Tensor, patch: int) -> list[int]:
    """Token positions (CLS is 0) of the patches whose pixels the trigger changes in most images."""
    changed = (clean - triggered).abs().sum(1) > 1e-6  # (N, H, W)
    n, height, width = changed.shape
    per_patch = changed.reshape(n, height // patch, patch, width // patch, patch).any(4).any(2)  # (N, h, w)
    share = per_patch.float().mean(0).flatten()
    return [1 + int(i) for i in torch.nonzero(share > 0.5).flatten()]


class Probe:
    """Forward passes of one model with FFN activations recorded, unit masks applied or tokens patched."""

    def __init__(self, model):
        self.model = model.eval()
        self.units = TransformerUnits.discover(model, ("ffn",))
        self.layers = self.units.layer_modules(model)
        self.final_norm = model.vit.layernorm

    @torch.no_grad()
    def logits(self, pixels: torch.Tensor, masks=None) -> torch.Tensor:
        out = []
        handle = self.units.attach(self.model, masks) if masks is not None else None
        try:
            for start in range(0, len(pixels), BATCH):
                out.append(self.model(pixel_values=pixels[start : start + BATCH]).logits)
        finally:
            if handle is not None:
                handle.remove()
        return torch.cat(out)

    @torch.no_grad()
    def ffn_activations(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """Per layer, (N, units): each FFN unit's activation (the FFN output projection's input) averaged over
        tokens."""
        per_layer: list[list[torch.Tensor]] = [[] for _ in self.units.groups]
        handles = []
        for index, group in enumerate(self.units.groups):
            module = self.model.get_submodule(group.module)
            handles.append(
                module.register_forward_pre_hook(
                    lambda m, args, index=index: per_layer[index].append(args[0].mean(1).float())
                )
            )
        try:
            self.logits(pixels)
        finally:
            for handle in handles:
                handle.remove()
        return [torch.cat(chunks) for chunks in per_layer]

    @torch.no_grad()
    def patched_logits(self, triggered: torch.Tensor, clean: torch.Tensor, position: int, tokens: list[int]):
        """Logits of the triggered images with ``tokens``' hidden states at the input of layer ``position`` (the
        final LayerNorm when ``position`` is the number of layers) taken from the same images without trigger."""
        module = self.final_norm if position == len(self.layers) else self.layers[position]
        out = []
        for start in range(0, len(triggered), BATCH):
            reference = self.model(pixel_values=clean[start : start + BATCH], output_hidden_states=True)
            replacement = reference.hidden_states[position]

            def hook(m, args, kwargs, replacement=replacement):
                hidden = args[0] if args else kwargs["hidden_states"]
                hidden = hidden.clone()
                hidden[:, tokens] = replacement[:, tokens].to(hidden.dtype)
                if args:
                    return (hidden, *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": hidden}

            handle = module.register_forward_pre_hook(hook, with_kwargs=True)
            try:
                out.append(self.model(pixel_values=triggered[start : start + BATCH]).logits)
            finally:
                handle.remove()
        return torch.cat(out)


def effect_sizes(probe: Probe, clean: torch.Tensor, triggered: torch.Tensor) -> list[np.ndarray]:
    """Per layer, each FFN unit's paired trigger effect over its clean spread: mean(a(x+t) - a(x)) / std(a(x))."""
    before, after = probe.ffn_activations(clean), probe.ffn_activations(triggered)
    return [((a - b).mean(0) / (b.std(0) + 1e-6)).numpy() for b, a in zip(before, after)]


class Scorer:
    def __init__(self, test_pixels, test_labels, asr_pixels, asr_clean_pixels, target):
        self.test_pixels, self.test_labels = test_pixels, test_labels
        self.asr_pixels, self.asr_clean_pixels, self.target = asr_pixels, asr_clean_pixels, target

    def __call__(self, probe: Probe, masks=None) -> tuple[float, float]:
        cacc = clean_accuracy(probe.logits(self.test_pixels, masks).argmax(-1).numpy(), self.test_labels)
        asr = attack_success_rate(probe.logits(self.asr_pixels, masks).argmax(-1).numpy(), self.target)
        return cacc, asr


def layer_profile(d: list[np.ndarray], strong: float) -> dict:
    return {
        "max_d_per_layer": [round(float(x.max()), 3) for x in d],
        "strong_units_per_layer": [int((x > strong).sum()) for x in d],
        "positive_d_share_per_layer": _shares([np.clip(x, 0, None).sum() for x in d]),
    }


def _shares(values) -> list[float]:
    total = float(sum(values)) or 1.0
    return [round(float(v) / total, 3) for v in values]


def _masks(probe: Probe, zeroed: dict[int, np.ndarray]):
    masks = probe.units.new_masks()
    for layer, index in zeroed.items():
        masks[layer].data[torch.as_tensor(index, dtype=torch.long)] = 0.0
    return masks


def ablations(probe: Probe, d: list[np.ndarray], score: Scorer, k: int, seed: int) -> dict:
    """Per layer: (CACC, ASR) with the layer's k units of largest d zeroed, and with k random units zeroed."""
    rng = np.random.default_rng(seed)
    top, random = [], []
    for layer, values in enumerate(d):
        top.append(score(probe, _masks(probe, {layer: np.argsort(-values)[:k]})))
        random.append(score(probe, _masks(probe, {layer: rng.choice(len(values), size=k, replace=False)})))
    everywhere = score(probe, _masks(probe, {layer: np.argsort(-values)[:k] for layer, values in enumerate(d)}))
    return {
        "ablate_top_k": k,
        "ablate_top_cacc_per_layer": [round(c, 4) for c, _ in top],
        "ablate_top_asr_per_layer": [round(a, 4) for _, a in top],
        "ablate_random_cacc_per_layer": [round(c, 4) for c, _ in random],
        "ablate_random_asr_per_layer": [round(a, 4) for _, a in random],
        "ablate_top_all_layers_cacc": round(everywhere[0], 4),
        "ablate_top_all_layers_asr": round(everywhere[1], 4),
    }


def head_ablations(model, score: Scorer) -> dict:
    """ASR and CACC with each attention head zeroed alone (the heads that could copy the trigger into CLS)."""
    heads = TransformerUnits.discover(model, ("head",))
    probe = Probe(model)
    asr, cacc = [], []
    for layer, group in enumerate(heads.groups):
        layer_asr, layer_cacc = [], []
        for head in range(group.size):
            masks = heads.new_masks()
            masks[layer].data[head] = 0.0
            with heads.attach(model, masks):
                c, a = score(probe)
            layer_asr.append(round(a, 4))
            layer_cacc.append(round(c, 4))
        asr.append(layer_asr)
        cacc.append(layer_cacc)
    return {"ablate_head_asr": asr, "ablate_head_cacc": cacc}


def patching(probe: Probe, score: Scorer, tokens: list[int]) -> dict:
    """ASR with the trigger's patch tokens, or the CLS token, restored to their trigger-free states at each layer's
    input (position L = the input of layer L; the last position is the final LayerNorm's input)."""
    out = {"trigger_tokens": tokens}
    for name, which in (("trigger_patches", tokens), ("cls", [0])):
        out[f"patch_{name}_asr_per_position"] = [
            round(
                attack_success_rate(
                    probe.patched_logits(score.asr_pixels, score.asr_clean_pixels, position, which).argmax(-1).numpy(),
                    score.target,
                ),
                4,
            )
            for position in range(len(probe.layers) + 1)
        ]
    return out


def pruned_against_d(report: dict, d: list[np.ndarray], k: int) -> dict:
    """Where RNP's pruned FFN units sit in the trigger-effect ranking of their layer."""
    ffn = [u for u in report.get("pruned_units", []) if u["kind"] == "ffn"]
    layers = len(d)
    per_layer = [sum(1 for u in ffn if u["layer"] == layer) for layer in range(layers)]
    in_top = [
        sum(1 for u in ffn if u["layer"] == layer and u["index"] in set(np.argsort(-d[layer])[:k].tolist()))
        for layer in range(layers)
    ]
    positive = [np.clip(x, 0, None) for x in d]
    covered = sum(float(positive[u["layer"]][u["index"]]) for u in ffn)
    ranks = [float((d[u["layer"]] > d[u["layer"]][u["index"]]).mean()) for u in ffn]  # 0: the strongest unit
    return {
        "pruned_ffn_per_layer": per_layer,
        "pruned_layernorm_per_layer": [
            sum(1 for u in report.get("pruned_units", []) if u["kind"] == "layernorm" and u["layer"] == layer)
            for layer in range(layers)
        ],
        "pruned_in_top_k_per_layer": in_top,
        # [layer, head] pairs, to set beside the heads whose ablation alone removes the backdoor (ablate_head_asr)
        "pruned_heads": [[u["layer"], u["index"]] for u in report.get("pruned_units", []) if u["kind"] == "head"],
        "pruned_share_of_positive_d": round(covered / max(sum(float(p.sum()) for p in positive), 1e-9), 4),
        "pruned_median_rank": round(float(np.median(ranks)), 3) if ranks else None,
    }


def _model_id(path) -> str:
    """A saved model's zoo key (its content-addressed folder name), or for a model saved elsewhere the last three
    parts of its path (``<zoo>/badnet_seed0/undefended``), which name it where its folder name alone does not."""
    path = Path(path).resolve()
    if len(path.name) == 64 and all(c in "0123456789abcdef" for c in path.name):
        return path.name
    return "/".join(path.parts[-3:])


def main(argv=None) -> list[dict]:
    mine, script, repair_args, training_args, rest = parse_args(argv)
    torch.manual_seed(training_args.seed)
    seed = training_args.seed
    task = limit_splits(load_image_task(script.dataset), script.max_train_samples, script.max_eval_samples, seed)
    attack = get_image_attack_config(
        script.attack, poison_rate=script.poison_rate, target_label=script.target_label, seed=seed
    )
    clean_rows, test, _ = repair.clean_split(repair_args, task, task["train"], seed, text=False)
    asr_rows = make_asr_dataset(test, attack)
    target = attack.target_label

    trainer, _ = vision.load_saved_vit(repair_args.load_model, training_args)
    control, _ = vision.load_saved_vit(repair_args.floor_model, training_args)
    processor = trainer.processing_class
    score = Scorer(
        _pixels(test, processor),
        np.asarray(test.with_format(None)["label"]),
        _pixels(asr_rows, processor),
        _pixels(test.select(asr_rows["row_index"]), processor),
        target,
    )
    clean, crop_padding = vision.repair_rows(trainer, clean_rows, script.crop_padding)  # as the recipe hands them
    tokens = _trigger_tokens(score.asr_clean_pixels, score.asr_pixels, trainer.model.config.patch_size)
    config = trainer.model.config
    base = {
        "dataset": "cifar10",
        "attack": attack.name,
        "asr_attack": attack.name,
        "model": describe_default_vit(
            **{k: getattr(config, k) for k in ("hidden_size", "num_hidden_layers", "patch_size")}
        ),
        "zoo_key": _model_id(repair_args.load_model),
        "control_zoo_key": _model_id(repair_args.floor_model),
        "poison_rate": script.poison_rate,
        "seed": seed,
        "device": device_name(),
        "num_eval": len(test),
        "num_asr": len(asr_rows),
        "top_k": mine.top_k,
        "crop_padding": crop_padding,
        "command": command_line("benchmarks/backdoor_location.py", sys.argv[1:] if argv is None else argv),
    }
    records = []

    def measure(probe: Probe, which: str, defense: str, extra: dict | None = None) -> dict:
        start = time.perf_counter()
        d = effect_sizes(probe, score.asr_clean_pixels, score.asr_pixels)
        cacc, asr = score(probe)
        record = {
            **base,
            **({"attack": "none", "poison_rate": 0.0} if which == "clean" else {}),
            "which": which,
            "defense": defense,
            "cacc": round(cacc, 4),
            "asr": round(asr, 4),
            "asr_floor": records[0]["asr"] if records else round(asr, 4),  # the control's ASR on the same rows
            "wall_s": (extra or {}).get("defense_wall_s"),
            "overhead": None,
            **layer_profile(d, mine.strong_d),
            **patching(probe, score, tokens),
            **(extra or {}),
        }
        if defense == "none":
            record.update(ablations(probe, d, score, mine.top_k, seed), **head_ablations(probe.model, score))
        record["analysis_s"] = round(time.perf_counter() - start, 1)
        _print(record)
        records.append(record)
        return record, d

    measure(Probe(control.model), "clean", "none")
    _, backdoor_d = measure(Probe(trainer.model), "backdoored", "none")

    # The defenses, each on the same backdoored weights and clean rows as in the sanitize recipe.
    undefended = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    configs = repair.repair_configs(repair_args, seed)
    runs = [(name, config, None) for name, config in configs.items()]
    if repair_args.exposed:
        trainer.model.load_state_dict(undefended)
        exposure = expose_model(trainer, clean, ExposeConfig(method=repair.EXPOSURE, seed=seed))
        runs += [(f"{name}+cul", config, exposure) for name, config in configs.items() if config.accepts_exposed]
    for name, config, exposure in runs:
        trainer.model.load_state_dict(undefended)
        _, report = sanitize_model(trainer, clean, config, exposed=exposure)
        extra = {"defense_wall_s": round(report["wall_s"], 1)}
        if "units" in report and tuple(report["units"]) != RNPConfig().units:  # keyed apart from the default's
            extra["rnp_units"] = ",".join(report["units"])
        if "pruned_units" in report:
            extra.update(pruned_against_d(report, backdoor_d, mine.top_k), num_pruned=report["num_pruned"])
        measure(Probe(trainer.model), "backdoored", name, extra)
    trainer.model.load_state_dict(undefended)

    if not mine.no_save:
        merge_records(Path(mine.output), records, key=_record_key)
        print(f"wrote {mine.output}")
    return records


def _record_key(record: dict) -> tuple:
    return record["zoo_key"], record["which"], record["defense"], record["seed"], record.get("rnp_units")


def _print(r: dict) -> None:
    print(f"\n== {r['which']} model, defense {r['defense']}: CACC {r['cacc']:.3f} ASR {r['asr']:.3f}", flush=True)
    print(f"   max d per layer {r['max_d_per_layer']}, units with d > strong: {r['strong_units_per_layer']}")
    print(f"   share of positive d per layer {r['positive_d_share_per_layer']}")
    print(f"   ASR, trigger patches {r['trigger_tokens']} restored at layer input 0..L: "
          f"{r['patch_trigger_patches_asr_per_position']}")  # fmt: skip
    print(f"   ASR, CLS restored at layer input 0..L: {r['patch_cls_asr_per_position']}")
    if "ablate_top_asr_per_layer" in r:
        print(f"   zero top-{r['ablate_top_k']} d units per layer: ASR {r['ablate_top_asr_per_layer']} "
              f"CACC {r['ablate_top_cacc_per_layer']}; all layers ASR {r['ablate_top_all_layers_asr']} "
              f"CACC {r['ablate_top_all_layers_cacc']}")  # fmt: skip
        print(f"   zero one head (ASR per layer, per head): {r['ablate_head_asr']}")
        print(f"   zero {r['ablate_top_k']} random units per layer: ASR {r['ablate_random_asr_per_layer']} "
              f"CACC {r['ablate_random_cacc_per_layer']}")  # fmt: skip
    if "pruned_ffn_per_layer" in r:
        print(f"   pruned FFN per layer {r['pruned_ffn_per_layer']} (in the top-{r['top_k']} d of their layer: "
              f"{r['pruned_in_top_k_per_layer']}), LayerNorm {r['pruned_layernorm_per_layer']}, "
              f"share of positive d {r['pruned_share_of_positive_d']}, median rank {r['pruned_median_rank']}")  # fmt: skip
        if r.get("rnp_units"):
            print(f"   units {r['rnp_units']}; pruned heads [layer, head]: {r['pruned_heads']}")


if __name__ == "__main__":
    main()

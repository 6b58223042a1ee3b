"""The trained-model cache (hf_backdoor.zoo): reuse, keys, atomic and verified entries, the cache folder."""

import json

import pytest
import torch
from transformers import AutoImageProcessor, ViTForImageClassification

from hf_backdoor import SyntacticConfig, zoo
from hf_backdoor.attacks.vision import ImageBadNetsConfig
from hf_backdoor.vision import default_image_processor
from hf_backdoor.zoo import TrainedModel, ZooConfig, list_entries, train_or_load, train_or_load_many
from tests.conftest import tiny_cifar_vit


def make_config(**overrides) -> ZooConfig:
    fields = dict(
        task="cifar10",
        model="tiny-vit",
        attack="badnet",
        attack_config={"patch_size": 3, "poison_rate": 0.1, "target_label": 0},
        poison_rate=0.1,
        seed=0,
        epochs=1,
        learning_rate=0.5,
        batch_size=4,
        model_config={"hidden_size": 32, "num_hidden_layers": 1},
        training={"weight_decay": 0.05},
    )
    fields.update(overrides)
    return ZooConfig(**fields)


class CountingTrainer:
    """A train_fn: a tiny ViT seeded by the config, one SGD step on random images; remembers every model it made."""

    def __init__(self, fail_on_seed=None):
        self.models, self.fail_on_seed = [], fail_on_seed

    def __call__(self, config: ZooConfig):
        if config.seed == self.fail_on_seed:
            raise RuntimeError("training crashed")
        model = tiny_cifar_vit(seed=config.seed)
        generator = torch.Generator().manual_seed(config.seed)
        images = torch.randn(config.batch_size, 3, 32, 32, generator=generator)
        labels = torch.randint(0, 10, (config.batch_size,), generator=generator)
        loss = model(pixel_values=images, labels=labels).loss
        loss.backward()
        torch.optim.SGD(model.parameters(), lr=config.learning_rate).step()
        self.models.append(model)
        return TrainedModel(model, default_image_processor(), info={"loss": loss.item(), "wall_s": 1.5})


def same_weights(model_dir, model) -> bool:
    loaded = ViTForImageClassification.from_pretrained(model_dir)
    return all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def test_a_second_call_reuses_the_model_without_training(tmp_path):
    train = CountingTrainer()
    model_dir, info = train_or_load(make_config(), train, cache_dir=tmp_path)
    assert not info["from_cache"] and len(train.models) == 1
    assert {"model.safetensors", "config.json", "preprocessor_config.json", "zoo_config.json", "run_info.json"} <= {
        p.name for p in model_dir.iterdir()
    }
    assert not list(model_dir.glob("*.bin")) and not list(model_dir.glob("*.pt"))  # no pickles
    assert info["wall_s"] == 1.5 and info["train_fn_wall_s"] > 0 and info["epochs"] == 1.0
    assert info["info"]["loss"] > 0 and info["key"] == model_dir.name == zoo.config_key(make_config())

    again_dir, again = train_or_load(make_config(), train, cache_dir=tmp_path)
    assert again["from_cache"] and len(train.models) == 1 and again_dir == model_dir
    assert same_weights(again_dir, train.models[0])
    assert list(AutoImageProcessor.from_pretrained(again_dir).image_mean) == list(default_image_processor().image_mean)
    stored = json.loads((model_dir / "zoo_config.json").read_text())
    assert stored["config"] == make_config().to_dict() and stored["library_version"] == zoo.library_version()


def test_any_change_of_the_config_or_the_library_version_trains_again(tmp_path, monkeypatch):
    train = CountingTrainer()
    first, _ = train_or_load(make_config(), train, cache_dir=tmp_path)
    changes = [
        dict(seed=1),
        dict(attack_config={"patch_size": 4, "poison_rate": 0.1, "target_label": 0}),
        dict(model_config={"hidden_size": 32, "num_hidden_layers": 2}),
        dict(training={"weight_decay": 0.0}),
        dict(attack="none", attack_config={}, poison_rate=0.0),
        dict(epochs=2),
    ]
    dirs = {first}
    for change in changes:
        model_dir, info = train_or_load(make_config(**change), train, cache_dir=tmp_path)
        assert not info["from_cache"]
        dirs.add(model_dir)
    assert len(dirs) == len(changes) + 1 == len(train.models) == len(list_entries(tmp_path))
    assert not same_weights(first, train.models[1])  # seed 1 is another model

    monkeypatch.setattr(zoo, "library_version", lambda: "99.0")
    _, info = train_or_load(make_config(), train, cache_dir=tmp_path)
    assert not info["from_cache"], "a model trained by another release must not be reused"


def test_the_key_ignores_dict_order_and_int_or_float_spelling():
    reordered = make_config(
        attack_config={"target_label": 0, "poison_rate": 0.1, "patch_size": 3}, epochs=1.0, seed="0", batch_size=4.0
    )
    assert zoo.config_key(reordered) == zoo.config_key(make_config())
    as_object = make_config(attack_config=ImageBadNetsConfig(poison_rate=0.1, target_label=0))
    assert as_object.attack_config["name"] == "badnet" and as_object.attack_config["patch_size"] == 3
    assert zoo.config_key(as_object) != zoo.config_key(make_config())


@pytest.mark.parametrize(
    "damage",
    ["no run_info", "no zoo_config", "truncated weights", "same-size corruption", "edited config", "missing weights"],
)
def test_an_incomplete_or_corrupt_entry_is_trained_again(tmp_path, damage, caplog):
    train = CountingTrainer()
    model_dir, _ = train_or_load(make_config(), train, cache_dir=tmp_path)
    weights = model_dir / "model.safetensors"
    if damage == "no run_info":  # a copy interrupted before its last file
        (model_dir / "run_info.json").unlink()
    elif damage == "no zoo_config":
        (model_dir / "zoo_config.json").unlink()
    elif damage == "truncated weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "same-size corruption":  # only the sha256 can see this one
        data = bytearray(weights.read_bytes())
        data[-10] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "edited config":
        stored = json.loads((model_dir / "zoo_config.json").read_text())
        stored["config"]["seed"] = 7
        (model_dir / "zoo_config.json").write_text(json.dumps(stored))
    else:
        weights.unlink()
    assert [e.problem for e in list_entries(tmp_path, include_unusable=True, verify_checksums=True)] != [None]
    assert list_entries(tmp_path, verify_checksums=True) == []

    with caplog.at_level("WARNING", logger="hf_backdoor.zoo"):
        again_dir, info = train_or_load(make_config(), train, cache_dir=tmp_path)
    assert not info["from_cache"] and len(train.models) == 2 and again_dir == model_dir
    assert "unusable" in caplog.text
    assert same_weights(again_dir, train.models[1])
    assert [e.problem for e in list_entries(tmp_path, verify_checksums=True)] == [None]
    assert [p.name for p in tmp_path.iterdir()] == [model_dir.name]  # nothing left aside


def test_a_half_written_temporary_folder_is_never_used_or_listed(tmp_path):
    train = CountingTrainer()
    model_dir, _ = train_or_load(make_config(), train, cache_dir=tmp_path)
    staging = tmp_path / f".tmp-{model_dir.name[:16]}-123-abcd"
    staging.mkdir()
    (staging / "model.safetensors").write_bytes(b"partial")
    assert [e.key for e in list_entries(tmp_path, include_unusable=True)] == [model_dir.name]
    _, info = train_or_load(make_config(seed=3), train, cache_dir=tmp_path)
    assert not info["from_cache"] and staging.exists()  # a fresh one may belong to a process still saving
    assert zoo._remove_abandoned(tmp_path, max_age_s=0.0) == [staging]


def test_hf_backdoor_cache_is_the_default_cache_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_BACKDOOR_CACHE", str(tmp_path / "zoo-here"))
    assert zoo.default_cache_dir() == tmp_path / "zoo-here"
    model_dir, _ = train_or_load(make_config(), CountingTrainer())
    assert model_dir.parent == tmp_path / "zoo-here"
    assert [e.path for e in list_entries()] == [model_dir]

    monkeypatch.delenv("HF_BACKDOOR_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert zoo.default_cache_dir() == tmp_path / "xdg" / "hf_backdoor" / "zoo"


def test_use_cache_false_neither_reads_nor_writes_the_cache(tmp_path):
    train = CountingTrainer()
    cache = tmp_path / "cache"
    train_or_load(make_config(), train, cache_dir=cache)
    out, info = train_or_load(make_config(), train, cache_dir=cache, use_cache=False, output_dir=tmp_path / "out")
    assert out == tmp_path / "out" and not info["from_cache"] and len(train.models) == 2
    assert same_weights(out, train.models[1]) and len(list_entries(cache)) == 1
    scratch, _ = train_or_load(make_config(seed=5), train, use_cache=False)
    assert scratch.is_dir() and cache not in scratch.parents and len(list_entries(cache)) == 1
    with pytest.raises(ValueError, match="use_cache=False"):
        train_or_load(make_config(), train, cache_dir=cache, output_dir=tmp_path / "x")


def test_a_failed_training_leaves_nothing_behind(tmp_path):
    with pytest.raises(RuntimeError, match="training crashed"):
        train_or_load(make_config(), CountingTrainer(fail_on_seed=0), cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_train_or_load_many_resumes_where_it_stopped(tmp_path, capsys):
    configs = [make_config(seed=seed) for seed in range(3)]
    crashing = CountingTrainer(fail_on_seed=2)
    with pytest.raises(RuntimeError):
        train_or_load_many(configs, crashing, cache_dir=tmp_path, progress=False)
    assert len(crashing.models) == 2 and len(list_entries(tmp_path)) == 2

    resumed = CountingTrainer()
    results = train_or_load_many(configs, resumed, cache_dir=tmp_path)
    assert len(resumed.models) == 1 and [info["from_cache"] for _, info in results] == [True, True, False]
    assert "model zoo" in capsys.readouterr().err  # the progress bar
    assert all(info["from_cache"] for _, info in train_or_load_many(configs, resumed, cache_dir=tmp_path))


def test_an_entry_published_meanwhile_by_another_process_is_kept(tmp_path):
    other = CountingTrainer()

    def racing_train(config):
        train_or_load(config, other, cache_dir=tmp_path)  # "another process" finishes first
        return CountingTrainer()(config)

    model_dir, info = train_or_load(make_config(), racing_train, cache_dir=tmp_path)
    assert info["from_cache"] and same_weights(model_dir, other.models[0])
    assert [p.name for p in tmp_path.iterdir()] == [model_dir.name]  # our copy was dropped


def test_configs_the_key_cannot_describe_are_rejected():
    with pytest.raises(ValueError, match=r"attack_config\.paraphrase_fn is a function"):
        make_config(attack_config={"poison_rate": 0.1, "paraphrase_fn": print})
    a_function_as_trigger = SyntacticConfig(poison_rate=0.1, paraphrase_fn=lambda texts: texts)
    with pytest.raises(ValueError, match=r"\['paraphrase_fn'\].*use_cache=False"):
        make_config(attack="syntactic", attack_config=a_function_as_trigger)
    with pytest.raises(ValueError, match="attack='none'"):
        make_config(attack="none", attack_config={}, poison_rate=0.1)
    with pytest.raises(ValueError, match="make them equal"):
        make_config(poison_rate=0.2)
    with pytest.raises(ValueError, match="finite"):
        make_config(training={"max_grad_norm": float("nan")})
    with pytest.raises(TypeError, match="integer"):
        make_config(seed=0.5)


def test_the_listing_command(tmp_path, capsys):
    model_dir, _ = train_or_load(make_config(), CountingTrainer(), cache_dir=tmp_path)
    (model_dir / "run_info.json").unlink()
    assert zoo.main(["--cache-dir", str(tmp_path)]) == 0
    assert "0 entries" in capsys.readouterr().out
    assert zoo.main(["--cache-dir", str(tmp_path), "--all"]) == 0
    assert "UNUSABLE: no readable run_info.json" in capsys.readouterr().out
    assert zoo.main(["--cache-dir", str(tmp_path), "--prune"]) == 0
    assert f"removed {model_dir}" in capsys.readouterr().out and not model_dir.exists()


def test_a_train_fn_that_changes_its_config_cannot_change_the_entry(tmp_path):
    config = make_config()
    train = CountingTrainer()

    def meddling_train(given):
        given.training["weight_decay"] = 0.5  # must not leak into the stored config or the caller's
        return train(given)

    model_dir, _ = train_or_load(config, meddling_train, cache_dir=tmp_path)
    assert config.training == {"weight_decay": 0.05} and model_dir.name == zoo.config_key(config)
    _, info = train_or_load(make_config(), train, cache_dir=tmp_path)
    assert info["from_cache"] and len(train.models) == 1

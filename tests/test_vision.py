"""Image tasks, the default ViT, transforms and the image poisoners, on real CIFAR-10 rows of the packaged copy."""

import io
import json
import logging

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from hf_backdoor import make_asr_dataset, poison_dataset
from hf_backdoor.attacks import build_poisoner, select_poison_rows
from hf_backdoor.attacks.vision import (
    BlendedConfig,
    ImageBadNetsConfig,
    SIGConfig,
    WaNetConfig,
    get_image_attack_config,
)
from hf_backdoor.attacks.vision.base import to_array
from hf_backdoor.attacks.vision.blended import BlendedPoisoner
from hf_backdoor.vision import (
    CIFAR10_LABELS,
    CIFAR10_MEAN,
    CIFAR10_STD,
    VIT_PRESETS,
    default_image_processor,
    default_vit_config,
    describe_default_vit,
    load_image_classifier,
    load_image_task,
    parse_config_overrides,
    prepare_image_dataset,
)
from hf_backdoor.vision.data import PACKAGED_DIR


@pytest.fixture(scope="module")
def rows(cifar):
    return cifar["train"].select(range(200))


def pixels(dataset):
    return np.stack([np.asarray(im) for im in dataset["image"]])


def test_packaged_copy_is_balanced_and_matches_its_manifest(cifar):
    manifest = json.loads((PACKAGED_DIR / "MANIFEST.json").read_text())
    assert {k: len(v) for k, v in cifar.items()} == {"train": 2000, "test": 500}
    for split, ds in cifar.items():
        assert ds.column_names == ["image", "label"]
        assert isinstance(ds.features["image"], datasets.Image)
        assert ds.features["label"].names == list(CIFAR10_LABELS)
        counts = np.bincount(ds["label"], minlength=10)
        assert counts.tolist() == [len(ds) // 10] * 10
        assert manifest["splits"][split]["rows"] == len(ds)
    image = cifar["train"][0]["image"]
    assert image.mode == "RGB" and image.size == (32, 32)
    assert sum((PACKAGED_DIR / "cifar10" / f"{s}.parquet").stat().st_size for s in cifar) < 6.5e6


def test_npz_and_image_folder_loaders_keep_real_pixels(tmp_path, rows, warnings_log):
    x = pixels(rows.select(range(20)))
    y = np.asarray(rows["label"][:20], dtype=np.uint8)
    np.savez(tmp_path / "c.npz", x_train=x, y_train=y, x_test=x[:5], y_test=y[:5], class_names=np.array(CIFAR10_LABELS))
    from_npz = load_image_task(str(tmp_path / "c.npz"))
    assert np.array_equal(pixels(from_npz["train"]), x) and from_npz["test"].num_rows == 5
    assert from_npz["train"].features["label"].names == list(CIFAR10_LABELS)

    # An image folder with one grayscale image and one odd-sized one: both are counted, not silently used.
    for i in range(6):
        folder = tmp_path / "folder" / "train" / CIFAR10_LABELS[int(y[i])]
        folder.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(x[i])
        image = image.convert("L") if i == 0 else image.resize((33, 31)) if i == 1 else image
        image.save(folder / f"{i}.png")
    loaded = load_image_task(str(tmp_path / "folder"))
    assert "1 of 6 images are not RGB (L: 1)" in warnings_log.text
    assert "2 different sizes" in warnings_log.text and "33x31: 1" in warnings_log.text
    assert {im.mode for im in loaded["train"]["image"]} == {"RGB"}
    resized = load_image_task(str(tmp_path / "folder"), image_size=32)
    assert {im.size for im in resized["train"]["image"]} == {(32, 32)}
    with pytest.raises(ValueError, match=r"1 of 6 images that are not RGB \(L: 1\).*convert_rgb=True"):
        load_image_task(str(tmp_path / "folder"), convert_rgb=False)


def test_hub_loading_offline_says_what_to_use_instead():
    with pytest.raises(ConnectionError, match="packaged copy `load_image_task\\('cifar10'\\)`"):
        load_image_task("uoft-cs/cifar10")


def test_badnets_patch_is_exactly_at_the_configured_pixels_and_only_in_poisoned_rows(rows):
    config = ImageBadNetsConfig(poison_rate=0.1, target_label=0, patch_size=3, seed=1)
    out = poison_dataset(rows, config)
    poisoned = np.asarray(out["poisoned"], dtype=bool)
    labels, orig = np.asarray(rows["label"]), np.asarray(out["orig_label"])
    # Rate and ground truth: int(rate * n) rows, the same rows the text poisoners would pick, labels flipped.
    assert poisoned.sum() == 20
    assert np.flatnonzero(poisoned).tolist() == select_poison_rows(rows, config, build_poisoner(config)).tolist()
    assert (orig == labels).all() and (labels[poisoned] != 0).all()
    assert (np.asarray(out["label"])[poisoned] == 0).all()
    assert (np.asarray(out["label"])[~poisoned] == labels[~poisoned]).all()
    before, after = pixels(rows), pixels(out)
    assert (after[poisoned, 29:, 29:] == 255).all()
    changed = (before != after).any(axis=-1)
    mask = np.zeros((32, 32), dtype=bool)
    mask[29:, 29:] = True
    assert not changed[:, ~mask].any()  # nothing outside the patch
    assert not changed[~poisoned].any()  # clean rows are byte-for-byte untouched
    raw_in = rows.cast_column("image", datasets.Image(decode=False))["image"]
    raw_out = out.cast_column("image", datasets.Image(decode=False))["image"]
    assert all(raw_in[i]["bytes"] == raw_out[i]["bytes"] for i in np.flatnonzero(~poisoned))

    corner = ImageBadNetsConfig(poison_rate=0.05, patch_size=4, position="top-left", margin=2, pattern="checkerboard")
    out = poison_dataset(rows, corner)
    row = int(np.flatnonzero(out["poisoned"])[0])
    patch = np.asarray(out[row]["image"])[2:6, 2:6, 0]
    assert patch.tolist() == [[255, 0, 255, 0], [0, 255, 0, 255]] * 2
    assert ImageBadNetsConfig(position=(5, 7)).top_left(32, 32) == (5, 7)


def test_asr_set_is_every_non_target_row_triggered_and_relabelled(cifar):
    test = cifar["test"].select(range(100))
    asr = make_asr_dataset(test, ImageBadNetsConfig(target_label=3))
    labels = np.asarray(test["label"])
    assert len(asr) == int((labels != 3).sum())
    assert set(asr["label"]) == {3} and set(asr["poisoned"]) == {1}
    assert np.asarray(asr["orig_label"]).tolist() == labels[labels != 3].tolist()
    assert (pixels(asr)[:, 29:, 29:] == 255).all()


def test_blended_is_the_alpha_mix_with_one_fixed_pattern(rows):
    config = BlendedConfig(poison_rate=0.1, target_label=0, alpha=0.2)
    out = poison_dataset(rows, config)
    poisoned = np.flatnonzero(out["poisoned"])
    pattern = BlendedPoisoner(config).pattern_for(32, 32, 3)
    expected = np.clip(np.rint(0.8 * pixels(rows.select(poisoned)).astype(np.float32) + 0.2 * pattern), 0, 255)
    assert np.array_equal(pixels(out.select(poisoned)), expected.astype(np.uint8))
    other = BlendedPoisoner(BlendedConfig(seed=1)).pattern_for(32, 32, 3)
    assert not np.array_equal(pattern, other)  # the noise pattern is drawn from the seed


def test_wanet_is_deterministic_per_seed_and_adds_noise_rows(rows):
    config = WaNetConfig(poison_rate=0.05, target_label=0, seed=0)
    first, again = poison_dataset(rows, config), poison_dataset(rows, config)
    other = poison_dataset(rows, WaNetConfig(poison_rate=0.05, target_label=0, seed=1))
    assert np.array_equal(pixels(first), pixels(again))
    poisoned = np.asarray(first["poisoned"], dtype=bool)
    before, after = pixels(rows).astype(int), pixels(first).astype(int)
    warp = np.abs(after[poisoned] - before[poisoned]).mean()
    assert 0.5 < warp < 20  # a real but small warp
    # Noise mode: cross_ratio 2 -> 2 x 10 clean rows warped too, labels and ground truth unchanged.
    noisy = (after != before).any(axis=(1, 2, 3)) & ~poisoned
    assert noisy.sum() == 20
    assert (np.asarray(first["label"])[noisy] == np.asarray(rows["label"])[noisy]).all()
    other_pixels = pixels(other).astype(int)
    both = poisoned & np.asarray(other["poisoned"], dtype=bool)
    assert both.any() and not np.array_equal(after[both], other_pixels[both])  # another seed, another warp field
    no_noise = poison_dataset(rows, WaNetConfig(poison_rate=0.05, target_label=0, cross_ratio=0))
    assert ((pixels(no_noise) != pixels(rows)).any(axis=(1, 2, 3)) == poisoned).all()


def test_sig_is_clean_label_with_the_sinusoid(rows):
    config = SIGConfig(poison_rate=0.05, target_label=2)
    out = poison_dataset(rows, config)
    poisoned = np.flatnonzero(out["poisoned"])
    labels = np.asarray(rows["label"])
    assert len(poisoned) == 10 and (labels[poisoned] == 2).all()
    assert np.asarray(out["label"]).tolist() == labels.tolist()  # clean-label: no label changes
    signal = 20 * np.sin(2 * np.pi * np.arange(32) * 6 / 32)
    expected = np.clip(np.rint(pixels(rows.select(poisoned)).astype(float) + signal[None, None, :, None]), 0, 255)
    assert np.array_equal(pixels(out.select(poisoned)), expected.astype(np.uint8))


def test_bad_image_inputs_raise_with_the_fix(rows):
    with pytest.raises(ValueError, match="A 40x40 patch at 'bottom-right' .* does not fit a 32x32 image"):
        poison_dataset(rows, ImageBadNetsConfig(patch_size=40))
    rgba = Image.fromarray(np.zeros((8, 8, 4), dtype=np.uint8))
    with pytest.raises(ValueError, match="Row 7 is a 'RGBA' image; .*Convert it"):
        to_array(rgba, 7)
    with pytest.raises(ValueError, match="must be uint8"):
        to_array(np.zeros((8, 8, 3), dtype=np.float32), 0)
    with pytest.raises(ValueError, match="no column 'img'.*image_column"):
        poison_dataset(rows, ImageBadNetsConfig(image_column="img"))
    with pytest.raises(ValueError, match="Unknown image attack 'addsent'; image attacks: \\['badnet', 'blended'"):
        get_image_attack_config("addsent")
    with pytest.raises(ValueError, match="alpha must be in"):
        BlendedConfig(alpha=0)
    with pytest.raises(ValueError, match="position must be one of"):
        ImageBadNetsConfig(position="bottom")
    with pytest.raises(ValueError, match="not a multiple of patch_size 4"):
        default_vit_config(image_size=30)


def test_default_vit_and_transforms(rows):
    config = default_vit_config()
    from transformers import ViTForImageClassification

    model = ViTForImageClassification(config)
    assert sum(p.numel() for p in model.parameters()) == 2_693_578  # the reference's 2.7M configuration
    processor = default_image_processor()
    images = rows.select(range(8))
    plain = prepare_image_dataset(images, processor)[:8]
    raw = pixels(images).astype(np.float32) / 255
    expected = (raw - np.array(CIFAR10_MEAN)) / np.array(CIFAR10_STD)
    np.testing.assert_allclose(plain["pixel_values"].numpy(), expected.transpose(0, 3, 1, 2), atol=1e-4)
    assert plain["label"] == list(images["label"])
    torch.manual_seed(0)
    augmented = prepare_image_dataset(images, processor, train=True, keep_row_index=True)[:8]
    assert augmented["pixel_values"].shape == (8, 3, 32, 32)
    assert not torch.allclose(augmented["pixel_values"], plain["pixel_values"])
    assert augmented["row_index"] == list(range(8))
    out = model(pixel_values=plain["pixel_values"])
    assert out.logits.shape == (8, 10)


def test_config_overrides_change_the_default_vit_and_reject_unknown_fields():
    overrides = parse_config_overrides("patch_size=8, hidden_dropout_prob=0.1,hidden_act=gelu")
    assert overrides == {"patch_size": 8, "hidden_dropout_prob": 0.1, "hidden_act": "gelu"}
    model, _ = load_image_classifier(None, **parse_config_overrides("patch_size=8"))
    assert model.config.patch_size == 8 and model.vit.embeddings.patch_embeddings.num_patches == 16
    assert describe_default_vit(patch_size=8) == "vit-small-32 (hidden 192, 6 layers, patch 8; from scratch)"
    assert parse_config_overrides(None) == {} == parse_config_overrides("")
    with pytest.raises(ValueError, match="not a ViTConfig field"):
        parse_config_overrides("patch=8")
    with pytest.raises(ValueError, match="not key=value"):
        parse_config_overrides("patch_size")
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        load_image_classifier(None, patch_size=5)


def test_cpu_preset_is_the_narrow_patch4_vit_and_takes_overrides_after_it():
    cpu = parse_config_overrides("cpu")
    assert cpu == VIT_PRESETS["cpu"] and cpu["hidden_size"] == 128 and cpu["num_hidden_layers"] == 4
    model, _ = load_image_classifier(None, **cpu)
    # Patch 4 (64 patches, so a 3x3 corner trigger stays inside one or two patches), 0.81M parameters.
    assert model.vit.embeddings.patch_embeddings.num_patches == 64
    assert 0.79e6 < sum(p.numel() for p in model.parameters()) < 0.83e6
    assert describe_default_vit(**cpu) == "vit-small-32 (hidden 128, 4 layers, patch 4; from scratch)"
    assert parse_config_overrides("cpu, num_hidden_layers=6") == {**cpu, "num_hidden_layers": 6}
    assert parse_config_overrides("reference") == {}
    with pytest.raises(ValueError, match="must come first"):
        parse_config_overrides("patch_size=8,cpu")


def test_grayscale_images_in_a_batch_are_converted_with_a_warning(rows, caplog):
    caplog.set_level(logging.WARNING, logger="hf_backdoor")
    gray = rows.select(range(4)).map(lambda b: {"image": [im.convert("L") for im in b["image"]]}, batched=True)
    batch = prepare_image_dataset(gray, default_image_processor())[:4]
    assert batch["pixel_values"].shape == (4, 3, 32, 32)
    assert "4 of 4 images in a batch are not RGB" in caplog.text
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((32, 32), dtype=np.uint8)).save(buffer, format="PNG")
    assert to_array({"bytes": buffer.getvalue(), "path": None}).shape == (32, 32, 1)  # grayscale poisons fine


# --- images stored as arrays or file paths, row ids, triggers the model's resizing erases -------------------------


def _as_array_dataset(dataset, kind):
    images = pixels(dataset)
    if kind == "uint8 list":  # how Dataset.from_dict stores uint8 arrays: List(List(List(Value('uint8'))))
        values, features = list(images), None
    elif kind == "int64 list":
        values, features = [im.astype(np.int64).tolist() for im in images], None
    else:
        values, features = (
            list(images),
            datasets.Features(
                {"image": datasets.Array3D(images.shape[1:], "uint8"), "label": dataset.features["label"]}
            ),
        )
    return datasets.Dataset.from_dict({"image": values, "label": dataset["label"]}, features=features)


@pytest.mark.parametrize("kind", ["uint8 list", "int64 list", "Array3D"])
def test_image_arrays_stored_in_a_dataset_poison_like_pil_images(rows, kind):
    config = ImageBadNetsConfig(poison_rate=0.1, target_label=0, seed=1)
    reference = poison_dataset(rows, config)
    data = _as_array_dataset(rows, kind)
    out = poison_dataset(data, config)
    assert out.features["image"] == data.features["image"]  # the column keeps its type
    assert out["poisoned"] == reference["poisoned"] and out["row_index"] == reference["row_index"]
    assert np.array_equal(np.asarray(out.with_format("numpy")["image"]), pixels(reference))
    asr = make_asr_dataset(data, config)
    assert (np.asarray(asr.with_format("numpy")["image"])[:, 29:, 29:] == 255).all()
    for name in ("blended", "sig", "wanet"):
        cfg = get_image_attack_config(name, poison_rate=0.05, target_label=0)
        assert np.array_equal(
            np.asarray(poison_dataset(data, cfg).with_format("numpy")["image"]), pixels(poison_dataset(rows, cfg))
        )
    # The model's transform reads them too (it used to fail: 'list' object has no attribute 'mode').
    processor = default_image_processor()
    batch = prepare_image_dataset(out.select(range(4)), processor, keep_row_index=True)[:4]
    expected = prepare_image_dataset(reference.select(range(4)), processor)[:4]
    assert torch.equal(batch["pixel_values"], expected["pixel_values"]) and batch["row_index"] == [0, 1, 2, 3]


def test_image_arrays_outside_0_255_or_floats_are_refused(rows):
    bad = [np.full((8, 8, 3), 300, dtype=np.int64).tolist()] * 4
    data = datasets.Dataset.from_dict({"image": bad, "label": [0, 1, 2, 3]})
    with pytest.raises(ValueError, match=r"Row \d: image values range over 300..300, outside the 0..255"):
        poison_dataset(data, ImageBadNetsConfig(poison_rate=0.5, target_label=0))
    with pytest.raises(ValueError, match=r"Row 0: image values range over 300..300"):
        prepare_image_dataset(data, default_image_processor())[:2]
    with pytest.raises(ValueError, match="must be uint8 \\(0-255\\) or integers in 0..255, got float64"):
        to_array(np.full((8, 8, 3), 0.5), 0)


def test_images_given_as_file_paths(tmp_path, rows):
    paths = []
    for i, image in enumerate(rows.select(range(20))["image"]):
        paths.append(str(tmp_path / f"{i}.png"))
        image.save(paths[-1])
    data = datasets.Dataset.from_dict({"image": paths, "label": rows["label"][:20]})
    config = ImageBadNetsConfig(poison_rate=0.2, target_label=0)
    out = poison_dataset(data, config)
    assert isinstance(out.features["image"], datasets.Image)  # paths become an image column
    poisoned = np.asarray(out["poisoned"], dtype=bool)
    assert np.array_equal(pixels(out)[~poisoned], pixels(rows.select(range(20)))[~poisoned])
    assert (pixels(out)[poisoned, 29:, 29:] == 255).all()
    raw = out.cast_column("image", datasets.Image(decode=False))["image"]
    assert all(raw[i]["path"] == paths[i] for i in np.flatnonzero(~poisoned))  # clean rows keep their file
    batch = prepare_image_dataset(data.select(range(2)), default_image_processor())[:2]
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    missing = datasets.Dataset.from_dict({"image": [str(tmp_path / "nope.png")] * 2, "label": [1, 1]})
    with pytest.raises(ValueError, match="image file .*nope.png' does not exist"):
        make_asr_dataset(missing, config)


def test_badnets_warns_when_the_models_resizing_erases_the_patch(rows, warnings_log):
    processor = default_image_processor()  # resizes to 32x32
    small = rows.select(range(40))
    poison_dataset(small, ImageBadNetsConfig(poison_rate=0.1, target_label=0), image_processor=processor)
    assert "BadNets patch" not in warnings_log.text  # 3x3 on 32x32 images: kept as it is
    large = small.map(lambda b: {"image": [im.resize((96, 96)) for im in b["image"]]}, batched=True)
    poison_dataset(large, ImageBadNetsConfig(poison_rate=0.1, target_label=0), image_processor=processor)
    assert "The 3x3 BadNets patch is stamped on 96x96 images, which the model's image processor resizes to 32x32" in (
        warnings_log.text
    )
    assert "about 1.0 pixel(s)" in warnings_log.text and "patch_size >= 6" in warnings_log.text
    warnings_log.clear()
    poison_dataset(large, ImageBadNetsConfig(poison_rate=0.1, target_label=0, patch_size=6), image_processor=processor)
    assert "BadNets patch" not in warnings_log.text
    from hf_backdoor import BadNetConfig

    texts = datasets.Dataset.from_dict({"text": ["a film"] * 10, "label": [0, 1] * 5})
    with pytest.raises(TypeError, match="text attack; it takes no image_processor"):
        poison_dataset(texts, BadNetConfig(), image_processor=processor)


def test_image_rows_carry_the_same_row_index_as_text_rows(rows):
    from hf_backdoor.data import ROW_INDEX

    out = poison_dataset(rows, ImageBadNetsConfig(poison_rate=0.1, target_label=0))
    assert out[ROW_INDEX] == list(range(len(rows)))
    shuffled = out.shuffle(seed=0)
    # prepare_image_dataset keeps the poisoner's ids (it numbers rows only when there is no row_index).
    batch = prepare_image_dataset(shuffled.select(range(4)), default_image_processor(), keep_row_index=True)[:4]
    assert batch[ROW_INDEX] == shuffled[ROW_INDEX][:4]


def test_image_label_ids_with_gaps_are_refused(tmp_path, rows):
    x = pixels(rows.select(range(6)))
    np.savez(tmp_path / "gaps.npz", x_train=x, y_train=np.array([0, 1, 5, 0, 1, 5]))
    with pytest.raises(ValueError, match=r"are \[0, 1, 5\], not the ids 0..2.*label_names="):
        load_image_task(str(tmp_path / "gaps.npz"))
    assert load_image_task(str(tmp_path / "gaps.npz"), label_names=list("abcdef"))["train"].num_rows == 6


def test_badnets_old_name_still_works_with_a_warning():
    with pytest.warns(FutureWarning, match="'badnets' is deprecated; use 'badnet'"):
        config = get_image_attack_config("badnets", patch_size=4)
    assert isinstance(config, ImageBadNetsConfig) and config.name == "badnet"


def test_backdoor_location_probes_find_the_trigger_patch_and_patching_every_token_restores_the_clean_forward(cifar):
    """benchmarks/backdoor_location.py: BadNets' corner patch is the one token it changes; restoring every token at
    a layer's input gives the trigger-free logits; zeroing a layer's top units through masks changes the output."""
    from benchmarks.backdoor_location import Probe, _masks, _pixels, _trigger_tokens, effect_sizes
    from hf_backdoor.attacks import get_image_attack_config
    from hf_backdoor.vision import default_image_processor
    from tests.conftest import tiny_cifar_vit

    test = cifar["test"].select(range(40))
    asr_rows = make_asr_dataset(test, get_image_attack_config("badnet", target_label=0))
    processor = default_image_processor()
    triggered, clean = _pixels(asr_rows, processor), _pixels(test.select(asr_rows["row_index"]), processor)
    model = tiny_cifar_vit()
    grid = model.config.image_size // model.config.patch_size
    assert _trigger_tokens(clean, triggered, model.config.patch_size) == [grid * grid]  # bottom-right, CLS is 0
    probe = Probe(model)
    every_token = list(range(grid * grid + 1))
    torch.testing.assert_close(probe.patched_logits(triggered, clean, 0, every_token), probe.logits(clean))
    assert not torch.allclose(probe.logits(triggered), probe.logits(clean))
    d = effect_sizes(probe, clean, triggered)
    assert [len(x) for x in d] == [model.config.intermediate_size]
    zeroed = probe.logits(triggered, _masks(probe, {0: np.argsort(-d[0])[:8]}))
    assert not torch.allclose(zeroed, probe.logits(triggered))

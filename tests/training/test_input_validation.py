"""Start-up checks: every bad option, path or data field is refused with our InputError, naming the option (or the
file and line) and what was expected, before any model is loaded."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from conftest import REPO, instantiate_cli, run_cli
from support.loading_guard import refuse_model_loads

from comat_lightning.errors import InputError, MissingInputFile, MissingInputPackage

DEMO = REPO / "configs" / "tiny_demo.yaml"


@pytest.fixture
def no_model_loads(monkeypatch):
    refuse_model_loads(monkeypatch)


def _write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# ------------------------------------------------------------------------------------------------ error types


def test_our_error_types_keep_the_builtin_ones():
    from datamodules.latents import LatentReferenceError
    from datamodules.prompts import PromptFileError

    assert issubclass(InputError, ValueError)
    assert issubclass(PromptFileError, InputError) and issubclass(LatentReferenceError, InputError)
    assert issubclass(MissingInputFile, InputError) and issubclass(MissingInputFile, FileNotFoundError)
    assert issubclass(MissingInputPackage, InputError) and issubclass(MissingInputPackage, OSError)


# ------------------------------------------------------------------------------------------------ paths


@pytest.mark.parametrize("value", ["stable-diffusion-v1-5/stable-diffusion-v1-5", "Salesforce/blip-image-captioning-large", "gpt2", "tiny://sd"])
def test_hub_ids_are_not_local_paths(value, tmp_path, monkeypatch):
    from comat_lightning.files.paths import check_local_path, looks_local

    monkeypatch.chdir(tmp_path)
    assert not looks_local(value)
    check_local_path("model.pretrained_model", value)


@pytest.mark.parametrize("value", ["./nope", "../nope", "/no/such/folder", "~nobody_here_at_all/x", "models/sd15"])
def test_missing_local_paths_are_refused_with_the_option(value, tmp_path, monkeypatch):
    from comat_lightning.files.paths import check_local_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()  # an existing parent folder makes "models/sd15" a local path
    with pytest.raises(MissingInputFile, match=rf"model.unet_path='{value}': no such UNet folder .* does not exist"):
        check_local_path("model.unet_path", value, "UNet folder")


def test_unknown_tiny_model_is_refused():
    from comat_lightning.files.paths import check_local_path

    with pytest.raises(InputError, match=r"ConceptMatchingLoss.captioner='tiny://blop': unknown tiny model"):
        check_local_path("ConceptMatchingLoss.captioner", "tiny://blop")


def test_callbacks_refuse_missing_local_model_paths_when_built(tmp_path):
    from callbacks import CompositionMetrics, ConceptMatchingLoss, FidelityPreservationLoss
    from comat_lightning.judges.grounded_sam import GroundedSAMMasks
    from comat_lightning.judges.masks import JsonlMasks

    gone = str(tmp_path / "gone")
    cases = {
        "ConceptMatchingLoss.captioner": lambda: ConceptMatchingLoss(captioner=gone),
        "CompositionMetrics.clip_model": lambda: CompositionMetrics(clip_model=gone),
        "CompositionMetrics.captioner": lambda: CompositionMetrics(captioner=gone),
        "FidelityPreservationLoss.discriminator_model": lambda: FidelityPreservationLoss(discriminator_model=gone),
        "GroundedSAMMasks.detector": lambda: GroundedSAMMasks(detector=gone),
        "GroundedSAMMasks.segmenter": lambda: GroundedSAMMasks(segmenter=gone),
        "JsonlMasks.root": lambda: JsonlMasks(root=gone),
    }
    for option, build in cases.items():
        with pytest.raises(MissingInputFile, match=rf"{option}='{gone}'"):
            build()
    ConceptMatchingLoss(captioner="Salesforce/blip-image-captioning-large")  # a hub id is left to the loader


# ------------------------------------------------------------------------------------------------ option values


def test_more_gradient_steps_than_denoising_steps_are_refused_at_instantiation(tmp_path, monkeypatch, no_model_loads):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match=r"model.gradient_steps: EvenlySpacedSteps: num_gradient_steps=11 exceeds num_inference_steps=10; .*model.sampler.num_inference_steps"):
        instantiate_cli(["--config", str(DEMO), "--trainer.logger=false", "--model.gradient_steps.init_args.num_gradient_steps=11"])


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf])
def test_every_loss_weight_must_be_finite_and_not_negative(bad):
    from callbacks import (
        AttentionRetentionLoss,
        AttentionSegregationLoss,
        AttributeConcentrationLoss,
        ConceptMatchingLoss,
        FidelityPreservationLoss,
    )
    from comat_lightning.judges.masks import JsonlMasks

    cases = [
        ("ConceptMatchingLoss", "weight", lambda w: ConceptMatchingLoss(weight=w)),
        ("AttributeConcentrationLoss", "weight", lambda w: AttributeConcentrationLoss(masks=JsonlMasks(), weight=w)),
        ("AttributeConcentrationLoss", "token_weight", lambda w: AttributeConcentrationLoss(masks=JsonlMasks(), token_weight=w)),
        ("AttributeConcentrationLoss", "pixel_weight", lambda w: AttributeConcentrationLoss(masks=JsonlMasks(), pixel_weight=w)),
        ("FidelityPreservationLoss", "weight", lambda w: FidelityPreservationLoss(weight=w)),
        ("AttentionSegregationLoss", "weight", lambda w: AttentionSegregationLoss(weight=w)),
        ("AttentionRetentionLoss", "weight", lambda w: AttentionRetentionLoss(weight=w)),
    ]
    for owner, option, build in cases:
        with pytest.raises(InputError, match=rf"{owner}: {option} must be >= 0 \(and finite\), got {bad}"):
            build(bad)


def test_guidance_weights_and_thresholds_are_checked():
    from comat_lightning.sampling.guided import AStarGuidance, AttendAndExciteGuidance

    with pytest.raises(InputError, match=r"model.guidance \(AStarGuidance\): retention_weight must be a finite number >= 0, got -1"):
        AStarGuidance(retention_weight=-1)
    with pytest.raises(InputError, match=r"model.guidance \(AStarGuidance\): scale must be a finite number >= 0, got nan"):
        AStarGuidance(scale=math.nan)
    with pytest.raises(InputError, match=r"thresholds maps steps >= 0 to peak attentions in \[0, 1\], got \{10: 5.0\}"):
        AttendAndExciteGuidance(thresholds={10: 5.0})


def test_unknown_attention_blocks_are_refused_naming_the_owner():
    from callbacks import AttentionMapLogger, AttentionSegregationLoss, AttributeConcentrationLoss, CompositionMetrics
    from comat_lightning.judges.masks import JsonlMasks

    expected = r"blocks must be a non-empty list of \['down', 'mid', 'up', 'joint'\], got \['middle'\]"
    for owner, build in {
        "AttributeConcentrationLoss blocks / resolutions": lambda: AttributeConcentrationLoss(masks=JsonlMasks(), blocks=["middle"]),
        "AttentionSegregationLoss blocks / resolution": lambda: AttentionSegregationLoss(blocks=["middle"]),
        "AttentionMapLogger blocks / resolutions": lambda: AttentionMapLogger(blocks=["middle"]),
        "CompositionMetrics attention_blocks": lambda: CompositionMetrics(attention_blocks=["middle"]),
    }.items():
        with pytest.raises(InputError, match=rf"^{owner}: attention layers: {expected}"):
            build()
    with pytest.raises(InputError, match=r"AttributeConcentrationLoss .*resolutions must be positive map sides"):
        AttributeConcentrationLoss(masks=JsonlMasks(), resolutions=[0])
    with pytest.raises(InputError, match=r"AttributeConcentrationLoss: attention capture: num_capture_steps must be an integer >= 1, got 0"):
        AttributeConcentrationLoss(masks=JsonlMasks(), num_capture_steps=0)


def test_monitor_prompts_are_checked_when_built(tmp_path):
    from callbacks import SampleImageLogger

    with pytest.raises(MissingInputFile, match=rf"SampleImageLogger.prompt_file='{tmp_path}/p.txt': no such prompt file"):
        SampleImageLogger(prompt_file=str(tmp_path / "p.txt"))
    with pytest.raises(InputError, match=r"SampleImageLogger: prompts\[1\] is empty"):
        SampleImageLogger(prompts=["a cat", " "])


# ------------------------------------------------------------------------------------------------ prompt files


def test_missing_prompt_files_name_their_option(tmp_path):
    from datamodules import PromptDataModule

    for stage, kwargs, option in [
        ("fit", dict(train_file=str(tmp_path / "train.jsonl")), "data.train_file"),
        ("fit", dict(train_file=str(REPO / "data" / "demo_prompts.jsonl"), val_file=str(tmp_path / "val.txt")), "data.val_file"),
        ("predict", dict(train_file="unused", predict_file=str(tmp_path / "p.txt")), "data.predict_file"),
        ("test", dict(train_file="unused", test_file=str(tmp_path / "t.txt")), "data.test_file"),
    ]:
        with pytest.raises(FileNotFoundError, match=rf"^{option}: prompt file {tmp_path}/\S+ does not exist \(expected a .txt"):
            PromptDataModule(**kwargs).setup(stage)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("concepts", ["car", "boat"], r"bad \"concepts\": entity 1: noun 'boat' is not in the prompt"),
        ("concepts", [], r"bad \"concepts\": \"concepts\" must be a non-empty list of words of the prompt, got \[\]"),
        ("token_indices", [-1, 2], r"bad \"token_indices\": .*integers >= 0, got \[-1, 2\]"),
        ("seed", -3, r"bad \"seed\": must be an integer in \[0, 9223372036854775807\], got -3"),
        ("seed", "7", r"bad \"seed\": must be an integer"),
        ("masks", ["car.png"], r"bad \"masks\": field 'masks' must map phrases to masks, got list"),
        ("masks", {"car": {"size": [2, 2], "counts": [1, 1]}}, r"bad \"masks\": phrase 'car' \(field 'masks'\): malformed RLE: RLE run lengths sum to 2, but 'size' 2x2 has 4"),
        ("masks", {"car": {"size": [100000, 100000], "counts": [0, 10**10]}}, r"bad \"masks\": .*larger than the largest mask accepted"),
        ("layout", {"car": 3}, r"bad \"layout\": phrase 'car' \(field 'layout'\): a mask must be an image path or an RLE dict, got int"),
        ("entities", {"noun": "car"}, r"bad \"entities\": entities of prompt 'a red car' must be a list of objects"),
    ],
)
def test_record_fields_of_the_wrong_shape_name_file_and_line(tmp_path, field, value, message):
    from datamodules import PromptFileError, read_prompt_file

    path = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a blue bus"}, {"prompt": "a red car", field: value}])
    with pytest.raises(PromptFileError, match=rf"^{path}:2: {message}"):
        read_prompt_file(path)


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompt": "a cat", "seed": ' + "9" * 5000 + "}", r"malformed JSON \(Exceeds the limit"),
        ("[" * 100_000 + "]" * 100_000, r"malformed JSON \(maximum recursion depth"),
        ('{"prompt": "a \\ud800 cat"}', r"'\\ud800', an unpaired surrogate that is not text"),
    ],
)
def test_json_that_python_parses_badly_is_refused_with_the_line(tmp_path, line, message):
    from datamodules import PromptFileError, read_prompt_file

    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a dog"}\n' + line + "\n")
    with pytest.raises(PromptFileError, match=rf"^{path}:2: .*{message}"):
        read_prompt_file(path)


def test_line_numbers_count_newlines_only_and_a_byte_order_mark_is_not_text(tmp_path):
    from datamodules import PromptFileError, read_prompt_file

    path = tmp_path / "p.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"prompt": "a cat\u2028on a mat"}, ensure_ascii=False).encode() + b"\r\n{bad\n")
    with pytest.raises(PromptFileError, match=rf"^{path}:2: malformed JSON"):
        read_prompt_file(path)
    path.write_bytes(path.read_bytes().replace(b"{bad", b'{"prompt": "a dog"}'))
    assert [r["prompt"] for r in read_prompt_file(path)] == ["a cat\u2028on a mat", "a dog"]


def test_missing_mask_files_are_refused_at_fit_setup_with_file_and_line(tmp_path, monkeypatch, no_model_loads):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").symlink_to(REPO / "data")
    prompts = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a red car"}, {"prompt": "a blue bus", "masks": {"bus": "masks/bus.png"}}])
    with pytest.raises(MissingInputFile, match=rf"^{prompts}:2, phrase 'bus' \(field 'masks'\): mask file '{tmp_path}/masks/bus.png' does not exist"):
        run_cli(["fit", "--config", str(DEMO), "--trainer.logger=false", f"--data.train_file={prompts}"])


def test_missing_layout_files_are_refused_at_predict_setup(tmp_path, monkeypatch):
    from datamodules import PromptDataModule

    monkeypatch.chdir(tmp_path)
    prompts = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a red car", "concepts": ["car"], "layout": {"car": "car.png"}}])
    with pytest.raises(MissingInputFile, match=rf"^{prompts}:1, phrase 'car' \(field 'layout'\): mask file '{tmp_path}/car.png' does not exist"):
        PromptDataModule(train_file=str(prompts)).setup("predict")


def test_real_latents_from_data_without_latents_are_refused_before_loading(tmp_path, monkeypatch, no_model_loads):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").symlink_to(REPO / "data")
    cfg = yaml.safe_load(DEMO.read_text())
    for callback in cfg["trainer"]["callbacks"]:
        if callback["class_path"] == "callbacks.FidelityPreservationLoss":
            callback["init_args"]["real_latents"] = "data"
    config = tmp_path / "data_latents.yaml"
    config.write_text(yaml.safe_dump(cfg))
    with pytest.raises(InputError, match=r"FidelityPreservationLoss\(real_latents='data'\): 12 of 12 training prompts have no \"latent\" \(first: .*demo_prompts.jsonl:1\)"):
        run_cli(["fit", "--config", str(config), "--trainer.logger=false"])


def test_a_spacy_pipeline_that_is_not_installed_is_an_input_error():
    from comat_lightning.text.entities import EntityParser

    with pytest.raises(MissingInputPackage, match=r"spacy_model='no_such_pipeline': no such spaCy pipeline is installed"):
        EntityParser("no_such_pipeline").parse("a red car")

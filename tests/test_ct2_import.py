"""CTranslate2 -> openai-whisper importer: format round trips, errors, and real models."""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import jiwer
import numpy as np
import pytest
import torch
import whisper
from whisper.model import ModelDimensions, Whisper, sinusoids

from tests.support.real_models import (
    base_ct2_dir,
    base_multilingual_checkpoint,
    speak,
    tiny_en_checkpoint,
    tiny_en_ct2_dir,
    warm_whisper_tokenizers,
)
from worker.ct2_import import assemble_split_model, convert_ct2_to_whisper, read_ct2_model

Variables = dict[str, np.ndarray[Any, Any]]

DIMS = ModelDimensions(
    n_mels=80,
    n_audio_ctx=1500,
    n_audio_state=64,
    n_audio_head=2,  # head dim 32, so the stored num_heads must win over the 64-dim fallback
    n_audio_layer=2,
    n_vocab=51865,
    n_text_ctx=448,
    n_text_state=64,
    n_text_head=2,
    n_text_layer=2,
)

# --- a minimal CTranslate2 writer, mirroring ctranslate2/specs/model_spec.py::_serialize ---

_TYPE_IDS = {"float32": 0, "int8": 1, "int16": 2, "int32": 3, "float16": 4}


def _string(s: str) -> bytes:
    raw = s.encode() + b"\0"
    return struct.pack("<H", len(raw)) + raw


def write_ct2(
    path: Path,
    variables: Variables,
    aliases: dict[str, str] | None = None,
    *,
    spec: str = "WhisperSpec",
) -> Path:
    """Write binary version 6 (float/int dtypes only; ctranslate2's own writer covers the rest)."""
    out = [struct.pack("<I", 6), _string(spec), struct.pack("<II", 3, len(variables))]
    for name, value in sorted(variables.items()):
        value = np.asarray(value)  # not ascontiguousarray: it turns 0-d flags into 1-d
        type_id = _TYPE_IDS[value.dtype.name]
        out += [_string(name), struct.pack("<B", value.ndim)]
        out += [struct.pack("<I", d) for d in value.shape]
        out += [struct.pack("<BI", type_id, value.nbytes), value.tobytes()]
    aliases = aliases or {}
    out.append(struct.pack("<I", len(aliases)))
    out += [_string(a) + _string(t) for a, t in aliases.items()]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(out))
    return path


def ct2_variables(model: Whisper) -> Variables:
    """Lay out an openai-whisper model as ctranslate2's Whisper converter does."""
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    v: Variables = {}

    def linear(dst: str, src: str) -> None:
        v[f"{dst}/weight"], v[f"{dst}/bias"] = sd[f"{src}.weight"], sd[f"{src}.bias"]

    def norm(dst: str, src: str) -> None:
        v[f"{dst}/gamma"], v[f"{dst}/beta"] = sd[f"{src}.weight"], sd[f"{src}.bias"]

    def fused(dst: str, srcs: list[str]) -> None:
        # The key projection has no bias; the converter zero-fills its slot.
        v[f"{dst}/weight"] = np.concatenate([sd[f"{s}.weight"] for s in srcs])
        v[f"{dst}/bias"] = np.concatenate(
            [sd.get(f"{s}.bias", np.zeros_like(sd[f"{s}.weight"][:, 0])) for s in srcs]
        )

    def block(dst: str, src: str, cross: bool) -> None:
        fused(
            f"{dst}/self_attention/linear_0", [f"{src}.attn.{p}" for p in ("query", "key", "value")]
        )
        linear(f"{dst}/self_attention/linear_1", f"{src}.attn.out")
        norm(f"{dst}/self_attention/layer_norm", f"{src}.attn_ln")
        if cross:
            linear(f"{dst}/attention/linear_0", f"{src}.cross_attn.query")
            fused(f"{dst}/attention/linear_1", [f"{src}.cross_attn.key", f"{src}.cross_attn.value"])
            linear(f"{dst}/attention/linear_2", f"{src}.cross_attn.out")
            norm(f"{dst}/attention/layer_norm", f"{src}.cross_attn_ln")
        linear(f"{dst}/ffn/linear_0", f"{src}.mlp.0")
        linear(f"{dst}/ffn/linear_1", f"{src}.mlp.2")
        norm(f"{dst}/ffn/layer_norm", f"{src}.mlp_ln")

    d = model.dims
    linear("encoder/conv1", "encoder.conv1")
    linear("encoder/conv2", "encoder.conv2")
    v["encoder/position_encodings/encodings"] = sd["encoder.positional_embedding"]
    for i in range(d.n_audio_layer):
        block(f"encoder/layer_{i}", f"encoder.blocks.{i}", cross=False)
    norm("encoder/layer_norm", "encoder.ln_post")
    v["decoder/embeddings/weight"] = sd["decoder.token_embedding.weight"]
    v["decoder/position_encodings/encodings"] = sd["decoder.positional_embedding"]
    for i in range(d.n_text_layer):
        block(f"decoder/layer_{i}", f"decoder.blocks.{i}", cross=True)
    norm("decoder/layer_norm", "decoder.ln")
    # Spec flags exactly as ctranslate2 stores them (0-d int8/int16).
    v["encoder/num_heads"] = np.array(d.n_audio_head, np.int16)
    v["decoder/num_heads"] = np.array(d.n_text_head, np.int16)
    v["decoder/activation"] = np.array(3, np.int8)  # GELU
    v["decoder/pre_norm"] = np.array(1, np.int8)
    v["decoder/alignment_layer"] = np.array(-1, np.int16)
    return v


TIED = {"decoder/projection/weight": "decoder/embeddings/weight"}


@pytest.fixture(scope="module")
def random_model() -> Whisper:
    torch.manual_seed(0)
    model = Whisper(DIMS)
    # Every parameter distinct and random, so any mixed-up mapping shows up as a mismatch.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model.half()


def _load(path: Path) -> dict[str, Any]:
    checkpoint: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    return checkpoint


def test_round_trip_is_exact(random_model: Whisper, tmp_path: Path) -> None:
    write_ct2(tmp_path / "ct2" / "model.bin", ct2_variables(random_model), TIED)

    dims = convert_ct2_to_whisper(tmp_path / "ct2", tmp_path / "out.pt")

    assert dims == DIMS
    checkpoint = _load(tmp_path / "out.pt")
    assert checkpoint["dims"] == asdict(DIMS)
    expected, got = random_model.state_dict(), checkpoint["model_state_dict"]
    assert got.keys() == expected.keys()
    for key, tensor in expected.items():
        assert got[key].dtype == torch.float16, key
        assert torch.equal(got[key], tensor), key
    # Strict loading (no missing or unexpected keys) through openai-whisper's own loader.
    loaded = whisper.load_model(str(tmp_path / "out.pt"), device="cpu")
    assert loaded.dims == DIMS


def test_read_ct2_model_returns_variables_and_aliases(
    random_model: Whisper, tmp_path: Path
) -> None:
    variables = ct2_variables(random_model)
    write_ct2(tmp_path / "model.bin", variables, TIED)

    got, aliases = read_ct2_model(tmp_path / "model.bin")

    assert aliases == TIED
    assert got.keys() == variables.keys()
    assert got["encoder/conv1/weight"].shape == (64, 80, 3)
    assert got["encoder/conv1/weight"].dtype == np.float16
    assert got["decoder/num_heads"].ndim == 0 and int(got["decoder/num_heads"]) == 2
    assert got["decoder/alignment_layer"].dtype == np.int16


def ct2_spec(model: Whisper) -> Any:
    """The same model as a ctranslate2 WhisperSpec, filled as its transformers converter does."""
    from ctranslate2.specs import whisper_spec

    sd = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    d = model.dims
    spec = whisper_spec.WhisperSpec(d.n_audio_layer, d.n_audio_head, d.n_text_layer, d.n_text_head)

    def linear(dst: Any, *srcs: str) -> None:
        dst.weight = np.concatenate([sd[f"{s}.weight"] for s in srcs])
        dst.bias = np.concatenate(
            [sd.get(f"{s}.bias", np.zeros_like(sd[f"{s}.weight"][:, 0])) for s in srcs]
        )

    def norm(dst: Any, src: str) -> None:
        dst.gamma, dst.beta = sd[f"{src}.weight"], sd[f"{src}.bias"]

    def layer(dst: Any, src: str, cross: bool) -> None:
        att = dst.self_attention
        linear(att.linear[0], *(f"{src}.attn.{p}" for p in ("query", "key", "value")))
        linear(att.linear[1], f"{src}.attn.out")
        norm(att.layer_norm, f"{src}.attn_ln")
        if cross:
            linear(dst.attention.linear[0], f"{src}.cross_attn.query")
            linear(dst.attention.linear[1], f"{src}.cross_attn.key", f"{src}.cross_attn.value")
            linear(dst.attention.linear[2], f"{src}.cross_attn.out")
            norm(dst.attention.layer_norm, f"{src}.cross_attn_ln")
        linear(dst.ffn.linear_0, f"{src}.mlp.0")
        linear(dst.ffn.linear_1, f"{src}.mlp.2")
        norm(dst.ffn.layer_norm, f"{src}.mlp_ln")

    enc, dec = spec.encoder, spec.decoder
    linear(enc.conv1, "encoder.conv1")
    linear(enc.conv2, "encoder.conv2")
    enc.position_encodings.encodings = sd["encoder.positional_embedding"]
    for i, block in enumerate(enc.layer):
        layer(block, f"encoder.blocks.{i}", cross=False)
    norm(enc.layer_norm, "encoder.ln_post")
    dec.embeddings.weight = sd["decoder.token_embedding.weight"]
    dec.position_encodings.encodings = sd["decoder.positional_embedding"]
    for i, block in enumerate(dec.layer):
        layer(block, f"decoder.blocks.{i}", cross=True)
    norm(dec.layer_norm, "decoder.ln")
    dec.projection.weight = dec.embeddings.weight
    # ctranslate2 calls a model multilingual when its vocabulary holds "" (id 50256), and
    # needs the special tokens by name to find <|startoftranscript|> and the languages.
    vocabulary = [f"t{i}" for i in range(d.n_vocab)]
    vocabulary[50256] = ""
    for name, token_id in whisper.tokenizer.get_tokenizer(multilingual=True).special_tokens.items():
        vocabulary[token_id] = name
    spec.register_vocabulary(vocabulary)
    spec.config.lang_ids = list(range(50259, 50259 + model.num_languages))
    return spec


@pytest.mark.parametrize(
    ("quantization", "atol"),
    [
        ("float16", 0.0),
        ("float32", 0.0),
        ("bfloat16", 4e-3),  # 7 mantissa bits
        ("int16", 1e-3),  # one scale per tensor
        ("int8", 4e-3),  # one scale per output row
        ("int8_float16", 4e-3),
    ],
)
def test_ctranslate2s_own_writer_and_runtime_agree(
    random_model: Whisper, tmp_path: Path, quantization: str, atol: float
) -> None:
    """Models written by ctranslate2's serializer (with its quantization and aliasing)
    convert, and the result computes what ctranslate2's runtime computes from the same file."""
    import ctranslate2

    warm_whisper_tokenizers()
    spec = ct2_spec(random_model)
    spec.validate()
    spec.optimize(quantization=quantization)
    spec.save(str(tmp_path))

    assert convert_ct2_to_whisper(tmp_path, tmp_path / "out.pt") == DIMS

    got = _load(tmp_path / "out.pt")["model_state_dict"]
    # Checkpoints stay float16 when the CT2 model has float16 weights (plain "int8" leaves
    # the unquantized ones in the source's float16); bfloat16 and int16 come out float32.
    widened = quantization in ("float32", "bfloat16", "int16")
    assert {t.dtype for t in got.values()} == {torch.float32 if widened else torch.float16}
    for key, expected in random_model.state_dict().items():
        torch.testing.assert_close(got[key].float(), expected.float(), atol=atol, rtol=0)

    ours = whisper.load_model(str(tmp_path / "out.pt"), device="cpu")
    theirs = ctranslate2.models.Whisper(str(tmp_path), device="cpu", compute_type="float32")
    mel = torch.randn(
        1, DIMS.n_mels, 2 * DIMS.n_audio_ctx, generator=torch.Generator().manual_seed(1)
    )
    features = ctranslate2.StorageView.from_array(mel.numpy())
    with torch.no_grad():
        encoded = ours.encoder(mel)
        _, language_probs = ours.detect_language(mel)
    np.testing.assert_allclose(np.array(theirs.encode(features)), encoded.numpy(), atol=2e-3)
    # One decoder step from <|startoftranscript|>: embeddings, cross-attention over the
    # encoder output (the fused k/v), the MLPs and the tied output projection.
    their_probs = dict(theirs.detect_language(features)[0])
    assert len(their_probs) == len(language_probs[0]) == 99
    for lang, p in language_probs[0].items():
        assert their_probs[f"<|{lang}|>"] == pytest.approx(p, rel=1e-3), lang


def test_head_count_falls_back_to_64_dim_heads(tmp_path: Path) -> None:
    dims = ModelDimensions(80, 1500, 128, 2, 1, 51864, 448, 128, 2, 1)
    variables = ct2_variables(Whisper(dims).half())
    del variables["encoder/num_heads"], variables["decoder/num_heads"]
    write_ct2(tmp_path / "ct2" / "model.bin", variables, TIED)

    assert convert_ct2_to_whisper(tmp_path / "ct2", tmp_path / "out.pt") == dims


def _drop(name: str) -> Callable[[Variables], None]:
    def mutate(variables: Variables) -> None:
        del variables[name]

    return mutate


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (_drop("decoder/layer_1/ffn/layer_norm/gamma"), "decoder/layer_1/ffn/layer_norm/gamma"),
        (_drop("encoder/conv1/weight"), "encoder/conv1/weight"),
        (lambda v: v.update({"encoder/extra/weight": np.zeros(3, np.float16)}), "unexpected"),
        (lambda v: v.update({"decoder/activation": np.array(1, np.int8)}), "GELU"),
        (lambda v: v.update({"decoder/num_heads": np.array(3, np.int16)}), "head counts"),
    ],
)
def test_non_whisper_weights_are_rejected(
    random_model: Whisper, tmp_path: Path, mutate: Callable[[Variables], None], message: str
) -> None:
    variables = ct2_variables(random_model)
    mutate(variables)
    write_ct2(tmp_path / "model.bin", variables, TIED)
    with pytest.raises(ValueError, match=message):
        convert_ct2_to_whisper(tmp_path, tmp_path / "out.pt")
    assert not list(tmp_path.glob("*.pt*")), "no partial output"


def test_other_ct2_models_and_garbage_are_rejected(random_model: Whisper, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"no model\.bin"):
        convert_ct2_to_whisper(tmp_path, tmp_path / "out.pt")

    (tmp_path / "model.bin").write_bytes(b"definitely not a model " * 50)
    with pytest.raises(ValueError, match=r"not a valid CTranslate2 model\.bin"):
        convert_ct2_to_whisper(tmp_path, tmp_path / "out.pt")

    good = write_ct2(tmp_path / "good" / "model.bin", ct2_variables(random_model), TIED)
    (tmp_path / "model.bin").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated"):
        convert_ct2_to_whisper(tmp_path, tmp_path / "out.pt")

    write_ct2(tmp_path / "model.bin", {"w": np.zeros(2, np.float32)}, spec="TransformerSpec")
    with pytest.raises(ValueError, match="TransformerSpec"):
        convert_ct2_to_whisper(tmp_path, tmp_path / "out.pt")

    (tmp_path / "config.json").write_text('{"quantization_type": 1}')
    write_ct2(tmp_path / "model.bin", ct2_variables(random_model), TIED)
    with pytest.raises(ValueError, match="AWQ"):
        convert_ct2_to_whisper(tmp_path, tmp_path / "out.pt")


def test_assemble_split_model(random_model: Whisper, tmp_path: Path) -> None:
    whole = write_ct2(tmp_path / "src" / "model.bin", ct2_variables(random_model), TIED)
    data = whole.read_bytes()
    parts = []
    for i, chunk in enumerate((data[:1000], data[1000:500_000], data[500_000:]), start=1):
        parts.append(tmp_path / f"model.bin.part{i}")
        parts[-1].write_bytes(chunk)
    extra = tmp_path / "extra"
    extra.mkdir()
    for name in ("config.json", "tokenizer.json", "vocabulary.json", "README.md"):
        (extra / name).write_text("{}")

    out = assemble_split_model(parts, extra, tmp_path / "out")

    assert (out / "model.bin").read_bytes() == data
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "model.bin",
        "tokenizer.json",
        "vocabulary.json",
    ]
    with pytest.raises(ValueError, match="do not assemble"):
        assemble_split_model([parts[0], parts[2], parts[1]], extra, tmp_path / "bad")
    with pytest.raises(ValueError, match="do not assemble"):
        assemble_split_model(parts[:2], extra, tmp_path / "bad")
    assert not (tmp_path / "bad" / "model.bin").exists()


# --- real models ---

_NORMALIZE = jiwer.Compose(
    [
        jiwer.ToLowerCase(),
        jiwer.RemovePunctuation(),  # type: ignore[no-untyped-call]
        jiwer.RemoveMultipleSpaces(),
        jiwer.Strip(),
        jiwer.ReduceToListOfListOfWords(),
    ]
)


def wer(reference: str, hypothesis: str) -> float:
    result: float = jiwer.wer(
        reference, hypothesis, reference_transform=_NORMALIZE, hypothesis_transform=_NORMALIZE
    )
    return result


def normalized(text: str) -> str:
    return " ".join(_NORMALIZE(text)[0])


ENGLISH = (
    "Hello, my name is Peter. Today I am going to the store to buy some bread and milk. "
    "The weather is nice and warm."
)
GERMAN = "Guten Morgen. Das Wetter ist heute sehr schön. Ich trinke gerne Kaffee."


@pytest.mark.slow
def test_tiny_en_transcribes_like_faster_whisper(tmp_path: Path) -> None:
    from faster_whisper import WhisperModel

    model = whisper.load_model(str(tiny_en_checkpoint()), device="cpu")
    assert model.dims == ModelDimensions(80, 1500, 384, 6, 4, 51864, 448, 384, 6, 4)
    assert not model.is_multilingual
    # ctranslate2 stores the encoder's sinusoids (in float16); they must be Whisper's.
    torch.testing.assert_close(
        model.encoder.positional_embedding, sinusoids(1500, 384), atol=1e-3, rtol=0
    )
    audio = speak(ENGLISH, tmp_path / "en.wav")

    ours = whisper.transcribe(model, str(audio), temperature=0.0, fp16=False)["text"]
    reference_model = WhisperModel(str(tiny_en_ct2_dir()), device="cpu", compute_type="float32")
    segments, _ = reference_model.transcribe(str(audio), beam_size=1, temperature=0.0)
    theirs = "".join(s.text for s in segments)

    print(f"ours:   {ours!r}\ntheirs: {theirs!r}\nWER vs script: {wer(ENGLISH, ours):.3f}")
    assert wer(ENGLISH, ours) < 0.15
    assert normalized(ours) == normalized(theirs)


@pytest.mark.slow
def test_base_multilingual_detects_german_and_translates(tmp_path: Path) -> None:
    from faster_whisper import WhisperModel

    model = whisper.load_model(str(base_multilingual_checkpoint()), device="cpu")
    assert model.dims == ModelDimensions(
        n_mels=80,
        n_audio_ctx=1500,
        n_audio_state=512,
        n_audio_head=8,
        n_audio_layer=6,
        n_vocab=51865,
        n_text_ctx=448,
        n_text_state=512,
        n_text_head=8,
        n_text_layer=6,
    )
    assert model.is_multilingual
    audio = whisper.load_audio(str(speak(GERMAN, tmp_path / "de.wav", voice="de")))

    mel = whisper.log_mel_spectrogram(whisper.pad_or_trim(audio))
    _, probs = model.detect_language(mel)
    assert max(probs, key=probs.get) == "de"
    transcript = whisper.transcribe(model, audio, language=None, temperature=0.0, fp16=False)
    assert transcript["language"] == "de"
    assert {"guten", "morgen", "kaffee"} <= set(normalized(transcript["text"]).split())

    english = whisper.transcribe(model, audio, task="translate", temperature=0.0, fp16=False)
    print(f"de: {transcript['text']!r}\nen: {english['text']!r}")
    assert {"morning", "weather", "coffee"} <= set(normalized(english["text"]).split())
    # The assembled directory is a working faster-whisper model, and agrees with ours.
    reference_model = WhisperModel(str(base_ct2_dir()), device="cpu", compute_type="float32")
    segments, info = reference_model.transcribe(
        audio, task="translate", beam_size=1, temperature=0.0
    )
    theirs = "".join(s.text for s in segments)
    print(f"faster-whisper ({info.language}): {theirs!r}")
    assert info.language == "de"
    assert normalized(english["text"]) == normalized(theirs)

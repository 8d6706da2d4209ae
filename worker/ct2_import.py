"""Import CTranslate2 Whisper models (faster-whisper's format) as openai-whisper checkpoints.

`model.bin` layout (ctranslate2 `specs/model_spec.py::_serialize`, `src/models/model.cc`), all
little-endian: u32 binary version; [v>=2] string spec name, u32 spec revision; u32 variable
count, then per variable: string name, u8 rank, u32 dims[rank], [v>=4] u8 dtype id and u32
byte count | [v<4] u8 item size and u32 element count, raw data; [v>=3] u32 alias count,
then (string alias, string target) pairs. A string is a u16 length counting a trailing NUL.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

if TYPE_CHECKING:
    import torch
    from whisper.model import ModelDimensions

__all__ = ["assemble_split_model", "convert_ct2_to_whisper", "read_ct2_model"]

Array = NDArray[Any]

_MAX_BINARY_VERSION = 6
# Index = ctranslate2::DataType; bfloat16 has no numpy dtype, so it is read as raw uint16.
_DTYPES = (np.float32, np.int8, np.int16, np.int32, np.float16, np.uint16)
_BFLOAT16 = 5
_ITEM_SIZE_DTYPES = {4: np.float32, 2: np.int16, 1: np.int8}  # binary versions < 4
_GELU = 3  # ctranslate2 Activation enum since WhisperSpec revision 3
# Every official Whisper model uses 64-dim heads; only used when the spec omits num_heads.
_HEAD_DIM = 64


class _Reader:
    def __init__(self, f: io.BufferedReader, path: Path) -> None:
        self.f, self.path, self.size = f, path, os.fstat(f.fileno()).st_size

    def fail(self, why: str) -> ValueError:
        return ValueError(f"{self.path}: not a valid CTranslate2 model.bin ({why})")

    def take(self, n: int) -> bytes:
        b = self.f.read(n)
        if len(b) != n:
            raise self.fail(f"truncated at byte {self.f.tell()}")
        return b

    def u(self, fmt: str) -> int:
        value: int = struct.unpack("<" + fmt, self.take(struct.calcsize(fmt)))[0]
        return value

    def string(self) -> str:
        n = self.u("H")
        raw = self.take(n)
        if n == 0 or raw[-1] != 0:
            raise self.fail("malformed string")
        try:
            return raw[:-1].decode()
        except UnicodeDecodeError:
            raise self.fail("malformed string") from None

    def array(self, shape: tuple[int, ...], dtype: Any, nbytes: int, name: str) -> Array:
        arr = np.empty(shape, dtype)
        if nbytes != arr.nbytes:
            raise self.fail(f"{name!r} has {nbytes} bytes for shape {shape}")
        # Read straight into a writable array: one copy, no read-only numpy views.
        if self.f.readinto(arr.reshape(-1).view(np.uint8).data) != nbytes:
            raise self.fail(f"truncated inside {name!r}")
        return arr


def _parse(path: Path, *, load: bool) -> tuple[str, int, dict[str, Array], dict[str, str]]:
    try:
        f = path.open("rb")
    except OSError as exc:
        raise ValueError(f"cannot read CTranslate2 model file {path}: {exc}") from exc
    with f:
        r = _Reader(f, path)
        version = r.u("I")
        if not 1 <= version <= _MAX_BINARY_VERSION:
            raise r.fail(f"binary version {version}")
        spec, revision = (r.string(), r.u("I")) if version >= 2 else ("", 1)
        variables: dict[str, Array] = {}
        for _ in range(r.u("I")):
            name = r.string()
            shape = tuple(r.u("I") for _ in range(r.u("B")))
            if version >= 4:
                type_id = r.u("B")
                if type_id >= len(_DTYPES):
                    raise r.fail(f"{name!r} has unknown dtype id {type_id}")
                dtype: Any = _DTYPES[type_id]
                nbytes = r.u("I")
            else:
                item_size = r.u("B")
                if item_size not in _ITEM_SIZE_DTYPES:
                    raise r.fail(f"{name!r} has item size {item_size}")
                dtype, nbytes = _ITEM_SIZE_DTYPES[item_size], r.u("I") * item_size
            # Bound the payload before allocating it, so garbage cannot request terabytes.
            if nbytes > r.size - f.tell():
                raise r.fail(f"truncated: {name!r} needs {nbytes} bytes")
            if load:
                arr = r.array(shape, dtype, nbytes, name)
                if version >= 4 and type_id == _BFLOAT16:
                    arr = (arr.astype(np.uint32) << 16).view(np.float32)
                variables[name] = arr
            else:
                f.seek(nbytes, os.SEEK_CUR)
        aliases = {}
        if version >= 3:
            for _ in range(r.u("I")):
                alias = r.string()
                aliases[alias] = r.string()
        if f.tell() != r.size:
            raise r.fail(f"{r.size - f.tell()} unexpected trailing bytes")
    return spec, revision, variables, aliases


def _dequantize(variables: dict[str, Array], path: Path) -> None:
    if zeros := [n for n in variables if n.endswith("_zero")]:
        raise ValueError(f"{path}: AWQ zero points {zeros[:3]}...; AWQ models are not supported")
    for scale_name in [n for n in variables if n.endswith("_scale")]:
        name = scale_name.removesuffix("_scale")
        q, scale = variables.get(name), variables[scale_name]
        if q is None or q.dtype.kind not in "iu" or q.ndim == 0:
            continue  # a float hyperparameter that merely ends in "_scale"
        # ctranslate2 stores q = round(w * scale): one scale per output row for int8
        # (conv kernels flattened per output channel), a single scalar for int16.
        if q.size % scale.size:
            raise ValueError(f"{path}: {scale.size} scales do not fit {name!r} {q.shape}")
        rows = q.reshape(scale.size, -1).astype(np.float32) / scale.reshape(-1, 1)
        variables[name] = rows.reshape(q.shape)
        del variables[scale_name]


def read_ct2_model(model_bin: Path) -> tuple[dict[str, Array], dict[str, str]]:
    """Parse a CTranslate2 `model.bin` into (variables, aliases) without the ctranslate2 runtime.

    int8/int16-quantized weights are dequantized to float32 and their `*_scale` companions
    dropped; bfloat16 is widened to float32. Raises ValueError for anything that is not a
    complete, well-formed model.bin.
    """
    _, _, variables, aliases = _parse(Path(model_bin), load=True)
    _dequantize(variables, Path(model_bin))
    return variables, aliases


def _scalar(variables: dict[str, Array], name: str) -> int | None:
    v = variables.get(name)
    return None if v is None or v.ndim != 0 else int(v)


def convert_ct2_to_whisper(src_dir: Path, out_path: Path) -> ModelDimensions:
    """Convert a CTranslate2 Whisper model directory into an openai-whisper `.pt` checkpoint.

    All dimensions come from the weight shapes (head counts from the spec's `num_heads`,
    else 64-dim heads). Floating weights keep the model's precision (float16 stays float16).
    The file is written atomically, so readers never see a partial checkpoint.
    """
    # Lazy: app.cli imports this module and must stay free of torch/whisper until used.
    import torch
    from whisper.model import ModelDimensions

    src_dir, out_path = Path(src_dir), Path(out_path)
    model_bin = src_dir / "model.bin"
    if not model_bin.is_file():
        raise ValueError(f"{src_dir} is not a CTranslate2 model directory: no model.bin")
    config_file = src_dir / "config.json"
    if config_file.is_file():
        try:
            quant = json.loads(config_file.read_text()).get("quantization_type", 0)
        except (ValueError, AttributeError) as exc:
            raise ValueError(f"{config_file} is not a JSON object: {exc}") from exc
        if quant not in (0, None):
            raise ValueError(f"{src_dir}: quantization_type {quant!r} (AWQ) is not supported")

    spec, revision, variables, aliases = _parse(model_bin, load=True)
    if spec != "WhisperSpec":
        raise ValueError(f"{model_bin} holds a {spec or 'legacy'} model, not WhisperSpec")
    _dequantize(variables, model_bin)
    if revision >= 3 and _scalar(variables, "decoder/activation") not in (None, _GELU):
        raise ValueError(f"{model_bin}: decoder activation is not exact GELU")

    for alias, target in aliases.items():
        if target not in variables:
            raise ValueError(f"{model_bin}: alias {alias!r} points to missing {target!r}")
        variables[alias] = variables[target]
    # Scalars are spec flags (num_heads, pre_norm, ...), not weights.
    pending = {name for name, v in variables.items() if v.ndim > 0}

    def take(name: str) -> Array:
        if name not in variables:
            raise ValueError(f"{model_bin}: not a Whisper CTranslate2 model, missing {name!r}")
        pending.discard(name)
        return variables[name]

    embedding = take("decoder/embeddings/weight")
    projection = variables.get("decoder/projection/weight", embedding)
    pending.discard("decoder/projection/weight")
    if projection is not embedding and not np.array_equal(projection, embedding):
        raise ValueError(f"{model_bin}: output projection is not tied to the token embedding")
    bias = variables.get("decoder/projection/bias")
    pending.discard("decoder/projection/bias")
    if bias is not None and np.any(bias):
        raise ValueError(f"{model_bin}: output projection has a bias; openai-whisper has none")

    floats = [v.dtype for v in variables.values() if v.dtype.kind == "f" and v.ndim > 0]
    dtype = torch.float16 if np.dtype(np.float16) in floats else torch.float32
    sd: dict[str, torch.Tensor] = {}

    def put(dst: str, arr: Array) -> None:
        if arr.dtype.kind != "f":
            raise ValueError(f"{model_bin}: {dst} is {arr.dtype} without a *_scale to dequantize")
        # A private copy per tensor: slices of fused weights must not drag their whole
        # storage (including the dropped key bias) into the checkpoint.
        sd[dst] = torch.from_numpy(np.ascontiguousarray(arr)).to(dtype, copy=True)

    def linear(dst: str, src: str) -> None:
        put(f"{dst}.weight", take(f"{src}/weight"))
        put(f"{dst}.bias", take(f"{src}/bias"))

    def norm(dst: str, src: str) -> None:
        put(f"{dst}.weight", take(f"{src}/gamma"))
        put(f"{dst}.bias", take(f"{src}/beta"))

    def fused(dsts: list[str], src: str) -> None:
        # ctranslate2 concatenates q/k/v (or k/v) along the output rows and zero-fills the
        # absent key bias. openai-whisper's key has no bias, and dropping it is exact anyway:
        # q·(k + b) shifts every logit of a query by the same q·b, which softmax ignores.
        weights = np.split(take(f"{src}/weight"), len(dsts))
        biases = np.split(take(f"{src}/bias"), len(dsts))
        for dst, w, b in zip(dsts, weights, biases, strict=True):
            put(f"{dst}.weight", w)
            if not dst.endswith(".key"):
                put(f"{dst}.bias", b)

    def layer_count(stack: str) -> int:
        n = 0
        while any(k.startswith(f"{stack}/layer_{n}/") for k in variables):
            n += 1
        return n

    def block(dst: str, src: str, *, cross: bool) -> None:
        fused(
            [f"{dst}.attn.query", f"{dst}.attn.key", f"{dst}.attn.value"],
            f"{src}/self_attention/linear_0",
        )
        linear(f"{dst}.attn.out", f"{src}/self_attention/linear_1")
        norm(f"{dst}.attn_ln", f"{src}/self_attention/layer_norm")
        if cross:
            linear(f"{dst}.cross_attn.query", f"{src}/attention/linear_0")
            fused([f"{dst}.cross_attn.key", f"{dst}.cross_attn.value"], f"{src}/attention/linear_1")
            linear(f"{dst}.cross_attn.out", f"{src}/attention/linear_2")
            norm(f"{dst}.cross_attn_ln", f"{src}/attention/layer_norm")
        linear(f"{dst}.mlp.0", f"{src}/ffn/linear_0")
        linear(f"{dst}.mlp.2", f"{src}/ffn/linear_1")
        norm(f"{dst}.mlp_ln", f"{src}/ffn/layer_norm")

    conv1 = take("encoder/conv1/weight")
    audio_pos = take("encoder/position_encodings/encodings")
    text_pos = take("decoder/position_encodings/encodings")
    n_audio_state, n_text_state = conv1.shape[0], embedding.shape[1]
    n_audio_layer, n_text_layer = layer_count("encoder"), layer_count("decoder")
    if conv1.ndim != 3 or n_audio_layer == 0 or n_text_layer == 0:
        raise ValueError(f"{model_bin}: not a Whisper CTranslate2 model (no conv/layer stack)")
    dims = ModelDimensions(
        n_mels=conv1.shape[1],
        n_audio_ctx=audio_pos.shape[0],
        n_audio_state=n_audio_state,
        n_audio_head=_scalar(variables, "encoder/num_heads") or n_audio_state // _HEAD_DIM,
        n_audio_layer=n_audio_layer,
        n_vocab=embedding.shape[0],
        n_text_ctx=text_pos.shape[0],
        n_text_state=n_text_state,
        n_text_head=_scalar(variables, "decoder/num_heads") or n_text_state // _HEAD_DIM,
        n_text_layer=n_text_layer,
    )

    put("encoder.positional_embedding", audio_pos)
    put("encoder.conv1.weight", conv1)
    put("encoder.conv1.bias", take("encoder/conv1/bias"))
    linear("encoder.conv2", "encoder/conv2")
    for i in range(n_audio_layer):
        block(f"encoder.blocks.{i}", f"encoder/layer_{i}", cross=False)
    norm("encoder.ln_post", "encoder/layer_norm")
    put("decoder.positional_embedding", text_pos)
    put("decoder.token_embedding.weight", embedding)
    for i in range(n_text_layer):
        block(f"decoder.blocks.{i}", f"decoder/layer_{i}", cross=True)
    norm("decoder.ln", "decoder/layer_norm")

    if pending:
        raise ValueError(f"{model_bin}: unexpected variables {sorted(pending)}")
    if n_audio_state % dims.n_audio_head or n_text_state % dims.n_text_head:
        raise ValueError(f"{model_bin}: head counts do not divide the widths in {dims}")
    _check_layout(dims, sd, model_bin)

    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        with tmp.open("xb") as f:
            torch.save({"dims": asdict(dims), "model_state_dict": sd}, f)
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return dims


def _check_layout(dims: ModelDimensions, sd: dict[str, torch.Tensor], model_bin: Path) -> None:
    import torch
    from whisper.model import AudioEncoder, TextDecoder

    # On the meta device the reference costs no memory, even for large-v3. Whisper itself
    # cannot be built there (its sparse alignment_heads buffer), but it only adds that
    # non-persistent buffer on top of these two modules.
    d = dims
    with torch.device("meta"):
        parts = {
            "encoder": AudioEncoder(
                d.n_mels, d.n_audio_ctx, d.n_audio_state, d.n_audio_head, d.n_audio_layer
            ),
            "decoder": TextDecoder(
                d.n_vocab, d.n_text_ctx, d.n_text_state, d.n_text_head, d.n_text_layer
            ),
        }
        ref = {f"{p}.{k}": v.shape for p, m in parts.items() for k, v in m.state_dict().items()}
    missing, unexpected = ref.keys() - sd.keys(), sd.keys() - ref.keys()
    wrong = sorted(k for k in ref.keys() & sd.keys() if ref[k] != sd[k].shape)
    if missing or unexpected or wrong:
        raise ValueError(
            f"{model_bin}: weights do not form an openai-whisper model {dims}: missing "
            f"{sorted(missing)}, unexpected {sorted(unexpected)}, wrong shape {wrong}"
        )


def assemble_split_model(parts: list[Path], extra_dir: Path, out_dir: Path) -> Path:
    """Concatenate `model.bin` parts (in the given order) into `out_dir/model.bin` and copy
    config, tokenizer and vocabulary files from `extra_dir`. Returns `out_dir`.

    The result is checked structurally (without loading weights), so a missing or misordered
    part fails here rather than inside faster-whisper.
    """
    if not parts:
        raise ValueError("no model.bin parts given")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".model.bin.{os.getpid()}.{uuid.uuid4().hex}.tmp"
    try:
        with tmp.open("xb") as out:
            for part in parts:
                with Path(part).open("rb") as f:
                    shutil.copyfileobj(f, out, 16 << 20)
        try:
            _parse(tmp, load=False)
        except ValueError as exc:
            raise ValueError(f"parts {[str(p) for p in parts]} do not assemble: {exc}") from exc
        os.replace(tmp, out_dir / "model.bin")
    finally:
        tmp.unlink(missing_ok=True)
    patterns = ("config.json", "preprocessor_config.json", "tokenizer*.json", "vocabulary.*")
    for pattern in patterns:
        for extra in Path(extra_dir).glob(pattern):
            shutil.copyfile(extra, out_dir / extra.name)
    return out_dir

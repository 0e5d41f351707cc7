"""Read and write HF model folders: ``config.json`` plus safetensors weights (single or sharded).

The native decoder uses HF parameter names, so a state dict goes to and from disk unchanged;
only a tied ``lm_head.weight`` is dropped on save (HF re-ties it on load).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from spmd_rl.errors import UserError, training_checkpoint_hint
from spmd_rl.models.args import ModelArgs
from spmd_rl.models.decoder import Transformer

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


def read_hf_config(path: str | os.PathLike) -> dict:
    """The parsed ``config.json`` of an HF model folder."""
    folder = Path(path)
    if not folder.is_dir():
        problem = "is not a folder" if folder.exists() else "does not exist"
        raise UserError(f"model folder {folder} {problem}; pass a local HF model folder (config.json + *.safetensors)")
    config_file = folder / CONFIG_NAME
    if not config_file.is_file():
        raise UserError(f"{config_file} not found; a model folder must hold an HF config.json"
                        + training_checkpoint_hint(folder))
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{config_file} is not valid JSON ({e}); re-export the model folder") from None


def load_state_dict(path: str | os.PathLike, device: torch.device | str = "cpu",
                    keep: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
    """All tensors of ``model.safetensors`` or of the shards listed in ``model.safetensors.index.json``;
    with ``keep``, only the names it accepts, the others never read (a pipeline stage's layers)."""
    if keep is not None:
        return {name: t.to(device) for name, t in iter_hf_tensors(path, keep)}
    state: dict[str, torch.Tensor] = {}
    for file in _weight_files(Path(path)):
        state.update(load_file(file, device=str(device)))
    return state


def iter_hf_tensors(path: str | os.PathLike,
                    keep: Callable[[str], bool] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, CPU tensor)`` of every weight of an HF folder (that ``keep`` accepts), read one at
    a time; the others are never read."""
    for file in _weight_files(Path(path)):
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in f.keys():
                if keep is None or keep(name):
                    yield name, f.get_tensor(name)


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a model folder, in a stable order."""
    index = folder / INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise UserError(
                f"{index} lists shards that are missing: {', '.join(missing)}; copy the complete model folder"
            )
        return files
    if (folder / WEIGHTS_NAME).is_file():
        return [folder / WEIGHTS_NAME]
    others = sorted(folder.glob("*.safetensors"))
    if others:
        return others
    hint = " (found pytorch_model*.bin: convert it to safetensors)" if list(folder.glob("pytorch_model*.bin")) else ""
    raise UserError(f"no weights in {folder}: expected {WEIGHTS_NAME} or {INDEX_NAME}{hint}")


def load_pretrained(
    path: str | os.PathLike, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> Transformer:
    """A native ``Transformer`` with the config and weights of an HF folder."""
    args = ModelArgs.from_hf_config(read_hf_config(path))
    state = load_state_dict(path, device)
    with torch.device("meta"):
        model = Transformer(args)
    load_weights(model, state, dtype=dtype, source=str(path))
    return model


def load_weights(model: Transformer, state: dict[str, torch.Tensor], *, dtype: torch.dtype, source: str) -> None:
    """Adopt ``state`` as the model's parameters (cast to ``dtype``); UserError if names or shapes differ."""
    tied = model.args.tie_word_embeddings
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}  # old HF buffers
    if tied:
        state.pop("lm_head.weight", None)  # some checkpoints store the tied copy anyway
    expected = set(model.state_dict().keys()) - ({"lm_head.weight"} if tied else set())
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        raise UserError(
            f"weights in {source} do not match its config.json: missing {missing[:3]}, unexpected {unexpected[:3]}; "
            "check that config.json belongs to these weights"
        )
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1].strip()
        raise UserError(f"weights in {source} do not match its config.json: {first}") from None
    model.tie_weights()


def save_pretrained(
    model_or_state_dict: nn.Module | dict[str, torch.Tensor],
    args: ModelArgs,
    out_dir: str | os.PathLike,
    *,
    max_shard_bytes: int = 2 * 1024**3,
    dtype: torch.dtype | None = None,
) -> None:
    """Write an HF folder (config.json + safetensors) that transformers and ``load_pretrained`` read.

    Weights above ``max_shard_bytes`` are split into ``model-0000k-of-0000n.safetensors`` shards
    with an index. Everything is written to a temporary sibling folder which then replaces
    ``out_dir``; other files already in ``out_dir`` (tokenizer, generation config) are kept.
    The state dict must hold full tensors: gather sharded (DTensor) parameters first.
    ``args`` gives config.json and the tying: a native ``ModelArgs``, or a generic model's
    :class:`~spmd_rl.models.generic.GenericExportArgs` with HF-named tensors.
    """
    tensors = _tensors_to_save(model_or_state_dict, args, dtype)
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    config = args.to_hf_config()
    saved_dtype = str(next(iter(tensors.values())).dtype).removeprefix("torch.") if tensors else "float32"
    config["dtype"] = config["torch_dtype"] = saved_dtype  # 5.x reads `dtype`, 4.x `torch_dtype`
    (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    _write_shards(tensors, tmp, max_shard_bytes)
    _replace_folder(tmp, out_dir)


def _tensors_to_save(
    source: nn.Module | dict[str, torch.Tensor], args: ModelArgs, dtype: torch.dtype | None
) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors by HF name, cast to ``dtype``, without the tied lm_head. Tensors
    that still share memory (a tied head under another name) are copied: safetensors refuses
    shared storage."""
    state = source.state_dict() if isinstance(source, nn.Module) else source
    tensors, storages = {}, set()
    for name, t in state.items():
        if args.tie_word_embeddings and name == "lm_head.weight":
            continue
        if hasattr(t, "device_mesh"):
            raise ValueError(f"{name} is a sharded DTensor; gather a full state dict before save_pretrained")
        t = t.detach().to("cpu")
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        t = t.contiguous()
        storage = t.untyped_storage().data_ptr()
        if storage in storages:
            t = t.clone()
        storages.add(storage)
        tensors[name] = t
    return tensors


def _write_shards(tensors: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int) -> None:
    """One ``model.safetensors``, or shards plus an index when the total exceeds the limit."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    for name, t in tensors.items():
        size = t.numel() * t.element_size()
        if shards[-1] and shard_bytes + size > max_shard_bytes:
            shards.append({})
            shard_bytes = 0
        shards[-1][name] = t
        shard_bytes += size
    metadata = {"format": "pt"}  # transformers refuses safetensors files without it
    if len(shards) == 1:
        save_file(shards[0], str(folder / WEIGHTS_NAME), metadata=metadata)
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        file_name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / file_name), metadata=metadata)
        weight_map.update(dict.fromkeys(shard, file_name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def _replace_folder(tmp: Path, out_dir: Path) -> None:
    """Move the finished ``tmp`` folder to ``out_dir``, keeping non-weight files of an old one."""
    if not out_dir.exists():
        os.replace(tmp, out_dir)
        return
    for entry in out_dir.iterdir():
        if entry.name == CONFIG_NAME or entry.name == INDEX_NAME or entry.name.endswith(".safetensors"):
            continue  # superseded by the new files
        target = tmp / entry.name
        if entry.is_dir():
            shutil.copytree(entry, target)
        else:
            shutil.copy2(entry, target)
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    os.replace(out_dir, old)
    os.replace(tmp, out_dir)  # out_dir is complete again from here on
    shutil.rmtree(old)


GENERATION_CONFIG_NAME = "generation_config.json"


def save_generation_config(
    out_dir: str | os.PathLike,
    *,
    eos_token_id: int | list[int] | None,
    bos_token_id: int | None = None,
    pad_token_id: int | None = None,
    base: dict | None = None,
) -> dict:
    """Write ``generation_config.json`` into ``out_dir`` and return what was written.

    ``base`` (e.g. the source folder's file, with its sampling defaults) is kept and its special
    token ids are replaced, so ``generate`` stops on the same tokens the rollouts stopped on.
    """
    config = dict(base or {})
    config.update(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    path = Path(out_dir) / GENERATION_CONFIG_NAME
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return config


def read_generation_config(model_dir: str | os.PathLike) -> dict:
    """The ``generation_config.json`` of an HF folder ({} when it has none); UserError when it is not JSON."""
    path = Path(model_dir) / GENERATION_CONFIG_NAME
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e}); fix or delete it") from None


def generation_token_ids(args: ModelArgs, tokenizer, base: dict) -> dict:
    """eos (every stop id of the source config, model config and tokenizer), bos and pad ids."""
    eos: list[int] = []
    for ids in (base.get("eos_token_id"), args.eos_token_id, tokenizer.eos_token_id):
        for i in ids if isinstance(ids, list) else [ids]:
            if i is not None and i not in eos:
                eos.append(int(i))
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else args.bos_token_id
    pad = next((i for i in (tokenizer.pad_token_id, args.pad_token_id, base.get("pad_token_id")) if i is not None),
               eos[0] if eos else None)
    return {"eos_token_id": eos[0] if len(eos) == 1 else (eos or None), "bos_token_id": bos, "pad_token_id": pad}

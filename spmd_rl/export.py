"""Turn a training checkpoint into an HF folder: ``python -m spmd_rl.export CHECKPOINT_DIR OUT_DIR``.

    python -m spmd_rl.export runs/x/checkpoints/step_000100 runs/x/hf_step100 \\
        [--config runs/x/config.yaml] [--dtype float32|bfloat16] [--shard-size-mb 2048] [--overwrite] \\
        [section.key=value ...]

One plain process, no torchrun: the actor's weights are read from the DCP checkpoint without a
process group (whatever the number of ranks that wrote it), the architecture comes from the
run's ``config.yaml`` (``model.path``'s config.json) and the tokenizer from
``model.tokenizer_path``. The folder (config.json, safetensors shards + index above the shard
size, tokenizer files, generation_config.json) is built in a temporary sibling and renamed to
OUT_DIR when complete, so OUT_DIR never holds half an export.
"""

from __future__ import annotations

import argparse
import os
import shutil
import warnings
from pathlib import Path
from typing import Callable

import torch

from spmd_rl.config import Config, load_config
from spmd_rl.errors import UserError, exit_on_user_error
from spmd_rl.models import NATIVE_MODEL_TYPES, ModelArgs, Transformer, read_hf_config
from spmd_rl.models.generic import HF_MODEL_PREFIX, GenericExportArgs, copy_remote_code, expected_hf_shapes
from spmd_rl.models.megatron.checkpoint import hf_state_from_shards, megatron_grid
from spmd_rl.durable_files import replace_folder
from spmd_rl.models.hf_io import (
    generation_token_ids,
    load_weights,
    read_generation_config,
    save_generation_config,
    save_pretrained,
)

ACTOR_PREFIX = "actor/model"  # key of the actor's model state dict in a trainer checkpoint
LEGACY_PREFIX = "model"  # checkpoints from before the critic existed stored the policy as model/optim
DECODER_PREFIX = "decoder."  # PolicyModel holds the HF-named decoder under this name
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DEFAULT_SHARD_SIZE_MB = 2048.0
MIB = 1024**2
STEP_FOLDER_HINT = "pass a <run_dir>/checkpoints/step_XXXXXX folder"


def check_checkpoint_dir(checkpoint_dir: str | os.PathLike) -> Path:
    """The checkpoint folder, or a UserError saying why it is not a complete DCP checkpoint."""
    folder = Path(checkpoint_dir)
    if not folder.exists():
        raise UserError(f"checkpoint folder {folder} does not exist; {STEP_FOLDER_HINT}")
    if not folder.is_dir():
        raise UserError(f"checkpoint {folder} is not a folder; {STEP_FOLDER_HINT}")
    if not (folder / ".metadata").is_file():
        hint = ""
        if (folder / "latest").is_file():
            hint = f" (this is a checkpoints folder; its newest checkpoint is {folder / (folder / 'latest').read_text().strip()})"
        elif folder.name.endswith(".tmp"):
            hint = " (a .tmp folder is a save that did not finish)"
        raise UserError(f"{folder} has no .metadata, so it is not a complete DCP checkpoint{hint}; {STEP_FOLDER_HINT}")
    return folder


def load_checkpoint_state(checkpoint_dir: str | os.PathLike, prefix: str = ACTOR_PREFIX) -> dict[str, torch.Tensor]:
    """Full CPU tensors of one state dict inside a DCP checkpoint, keyed by name without ``prefix``.

    Trainer checkpoints nest state dicts (``{"actor/model": {...}, "actor/optim": {...}}``) and
    DCP stores them flattened as ``"actor/model.<parameter name>"``. Only the tensors under
    ``prefix`` are read (optimizer moments stay on disk); DCP reassembles the full tensors from
    however many rank shards wrote them. Runs in a plain process: no process group needed.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    folder = check_checkpoint_dir(checkpoint_dir)
    entries = _read_metadata(folder).state_dict_metadata
    wanted = {k: m for k, m in entries.items() if k.startswith(prefix + ".") and isinstance(m, TensorStorageMetadata)}
    if not wanted:
        found = sorted({k.split(".", 1)[0] for k in entries})
        raise UserError(f"checkpoint {folder} holds no tensors under {prefix!r} (it holds {found}); "
                        f"choose one of those or {STEP_FOLDER_HINT}")
    state = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in wanted.items()}
    with warnings.catch_warnings():
        # no_dist=True is the intent; DCP still warns that no process group exists.
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.load(state, checkpoint_id=str(folder), no_dist=True)
    return {k[len(prefix) + 1:]: t for k, t in state.items()}


def checkpoint_state_names(checkpoint_dir: str | os.PathLike) -> list[str]:
    """The top-level state dicts of a trainer checkpoint, e.g. ``['actor/model', 'actor/optim']``."""
    entries = _read_metadata(check_checkpoint_dir(checkpoint_dir)).state_dict_metadata
    return sorted({k.split(".", 1)[0] for k in entries})


def _read_metadata(folder: Path):
    from torch.distributed.checkpoint import FileSystemReader

    try:
        return FileSystemReader(str(folder)).read_metadata()
    except Exception as e:  # truncated or foreign .metadata file
        raise UserError(f"cannot read {folder / '.metadata'} ({type(e).__name__}: {str(e)[:200]}); "
                        f"{STEP_FOLDER_HINT}") from None


def export_args(cfg: Config) -> ModelArgs | GenericExportArgs:
    """The architecture from ``model.path``'s config.json: the native decoder's ``ModelArgs``, or
    the transformers config when the run trained the generic model."""
    path = cfg.model.path
    try:
        hf_config = read_hf_config(path)
    except UserError as e:
        raise UserError(f"{e} (model.path of the run's config; if the folder moved, add model.path=DIR)") from None
    if cfg.model.implementation == "generic" or hf_config.get("model_type") not in NATIVE_MODEL_TYPES:
        return GenericExportArgs.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
    return ModelArgs.from_hf_config(hf_config)


def decoder_state(state: dict[str, torch.Tensor], args: ModelArgs | GenericExportArgs, source: str,
                  config_file: str, *, trust_remote_code: bool = False) -> dict[str, torch.Tensor]:
    """The policy's ``decoder.<HF name>`` (generic: ``decoder.hf_model.<HF name>``) tensors
    renamed to HF names, checked against the architecture of ``config_file``."""
    generic = isinstance(args, GenericExportArgs)
    prefix = DECODER_PREFIX + HF_MODEL_PREFIX if generic else DECODER_PREFIX
    if not generic and any(k.startswith(DECODER_PREFIX + HF_MODEL_PREFIX) for k in state):
        raise UserError(f"{source} holds a generic transformers model (decoder.hf_model.*) but {config_file} "
                        "describes the native decoder; add model.implementation=generic (the run's setting)")
    if generic and not any(k.startswith(prefix) for k in state) and any(k.startswith(DECODER_PREFIX) for k in state):
        raise UserError(f"{source} holds the native decoder (decoder.<HF name>), but {config_file} describes a "
                        "generic transformers model; pass the --config of the run that wrote this checkpoint")
    others = sorted(k for k in state if not k.startswith(prefix))
    if others:
        raise UserError(f"{source} holds tensors outside the policy decoder ({others[:3]}); "
                        "it was not written by the RL trainer's actor"
                        + (" from this generic transformers model" if generic else ""))
    state = {k[len(prefix):]: t for k, t in state.items()}
    if args.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # the tied copy; HF re-ties it from the embedding
    if generic:
        expected = expected_hf_shapes(Path(config_file).parent, trust_remote_code)
    else:
        with torch.device("meta"):
            expected = {k: tuple(t.shape) for k, t in Transformer(args).state_dict().items()}
    if args.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    wrong = sorted(k for k in expected.keys() & state.keys() if tuple(state[k].shape) != expected[k])
    if missing or unexpected or wrong:
        details = [f"{label} {names[:3]}" for label, names in
                   (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if names]
        raise UserError(f"{source} does not match the architecture in {config_file} "
                        f"({'; '.join(details)}); pass the --config of the run that wrote this checkpoint")
    return state


def check_out_dir(out_dir: str | os.PathLike, overwrite: bool, checkpoint_dir: Path) -> Path:
    """UserError when writing ``out_dir`` would clobber something the user did not ask to replace."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} exists and is not a folder; pass a new folder path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"output folder {out} exists and is not empty; pass --overwrite to replace it or choose a new folder")
    if out.resolve() == checkpoint_dir.resolve() or out.resolve() in checkpoint_dir.resolve().parents:
        raise UserError(f"output folder {out} contains the checkpoint {checkpoint_dir}; choose a folder outside it")
    return out


def export_checkpoint(
    checkpoint_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    cfg: Config,
    *,
    dtype: torch.dtype = torch.float32,
    max_shard_bytes: int = int(DEFAULT_SHARD_SIZE_MB * MIB),
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> Path:
    """Write the actor of ``checkpoint_dir`` as an HF folder at ``out_dir``; return ``out_dir``."""
    from spmd_rl.data.tokenizer import load_tokenizer

    ckpt = check_checkpoint_dir(checkpoint_dir)
    out = check_out_dir(out_dir, overwrite, ckpt)
    args = export_args(cfg)
    # The training-time chat template goes with the export, so prompts render as they did in rollouts.
    tokenizer = load_tokenizer(cfg.model.tokenizer_path, trust_remote_code=cfg.model.trust_remote_code,
                               require_chat_template=False, chat_template=cfg.data.chat_template or None)
    base = read_generation_config(cfg.model.path)

    names = checkpoint_state_names(ckpt)
    try:
        grid = megatron_grid(names)
    except ValueError as e:
        raise UserError(f"checkpoint {ckpt}: {e}; {STEP_FOLDER_HINT}") from None
    if grid is not None:  # actor.strategy=megatron: GPTModel shards, one state dict per tp x pp cell
        if isinstance(args, GenericExportArgs):
            raise UserError(f"checkpoint {ckpt} was written by actor.strategy=megatron (the native decoder), but "
                            f"{Path(cfg.model.path) / 'config.json'} describes a generic transformers model; pass the "
                            "--config of the run that wrote this checkpoint")
        log(f"loading the megatron actor (tp={grid[0]} x pp={grid[1]} x ep={grid[2]} shards) from {ckpt} "
            f"({args.architecture}, {args.num_layers} layers)")
        hf_state = hf_state_from_shards(lambda prefix: load_checkpoint_state(ckpt, prefix), args, *grid)
        state = {DECODER_PREFIX + k: v for k, v in hf_state.items()}
    else:
        prefix = LEGACY_PREFIX if LEGACY_PREFIX in names else ACTOR_PREFIX
        shape = (f"{(args.hf_config.get('architectures') or ['?'])[0]}, generic transformers model"
                 if isinstance(args, GenericExportArgs) else f"{args.architecture}, {args.num_layers} layers")
        log(f"loading {prefix} from {ckpt} ({shape})")
        state = load_checkpoint_state(ckpt, prefix)
    state = decoder_state(state, args, f"checkpoint {ckpt}", str(Path(cfg.model.path) / "config.json"),
                          trust_remote_code=cfg.model.trust_remote_code)
    if isinstance(args, GenericExportArgs):
        model = state  # HF names already, checked against the transformers model's
    else:
        with torch.device("meta"):
            model = Transformer(args)
        load_weights(model, state, dtype=torch.float32, source=f"checkpoint {ckpt}")
    num_bytes = sum(t.numel() for t in state.values()) * torch.empty((), dtype=dtype).element_size()
    log(f"writing {len(state)} tensors ({num_bytes / MIB:.1f} MiB, {str(dtype).removeprefix('torch.')}) to {out}")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.export-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_pretrained(model, args, tmp, max_shard_bytes=max_shard_bytes, dtype=dtype)
        copy_remote_code(cfg.model.path, args, tmp)
        tokenizer.save_pretrained(str(tmp))
        save_generation_config(tmp, base=base, **generation_token_ids(args, tokenizer, base))
        replace_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # only left when something above failed
    shards = len(list(out.glob("*.safetensors")))
    log(f"done: {out} ({shards} safetensors file{'s' if shards > 1 else ''})")
    return out


class _ArgumentParser(argparse.ArgumentParser):
    """argparse that reports usage mistakes as a one-line UserError (exit code 2, no usage dump)."""

    def error(self, message: str):
        raise UserError(f"{message}; see {self.prog} --help")


def _parser() -> argparse.ArgumentParser:
    p = _ArgumentParser(prog="python -m spmd_rl.export", description="Write a training checkpoint's policy as an HF folder.")
    p.add_argument("checkpoint_dir", help="a <run_dir>/checkpoints/step_XXXXXX folder")
    p.add_argument("out_dir", help="the HF folder to write (must not exist or be empty, unless --overwrite)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="config overrides, e.g. model.path=DIR when the model folder has moved")
    p.add_argument("--config", default=None, help="the run's config.yaml (default: CHECKPOINT_DIR/../../config.yaml)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of the written weights")
    p.add_argument("--shard-size-mb", type=float, default=DEFAULT_SHARD_SIZE_MB,
                   help="largest safetensors file in MiB; above it the weights are split with an index")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty out_dir")
    return p


@exit_on_user_error
def main(argv: list[str] | None = None) -> Path:
    a = _parser().parse_intermixed_args(argv)
    if a.shard_size_mb <= 0:
        raise UserError(f"--shard-size-mb must be > 0, got {a.shard_size_mb}")
    ckpt = check_checkpoint_dir(a.checkpoint_dir)
    check_out_dir(a.out_dir, a.overwrite, ckpt)
    if a.config is None:
        config_path = ckpt.resolve().parent.parent / "config.yaml"
        if not config_path.is_file():
            raise UserError(f"no config.yaml at {config_path} (the run folder two levels above the checkpoint); "
                            "pass --config <run_dir>/config.yaml")
    else:
        config_path = Path(a.config)
        if not config_path.is_file():
            raise UserError(f"config file {config_path} does not exist; pass --config <run_dir>/config.yaml")
    cfg = load_config(Config, str(config_path), a.overrides)
    return export_checkpoint(ckpt, a.out_dir, cfg, dtype=DTYPES[a.dtype],
                             max_shard_bytes=max(1, int(a.shard_size_mb * MIB)), overwrite=a.overwrite,
                             log=lambda line: print(line, flush=True))


if __name__ == "__main__":
    main()

"""A native decoder built on the meta device, sharded (TP, FSDP2) and then filled from an HF folder
tensor by tensor holds the checkpoint's weights exactly: gathered back, every parameter equals
``load_pretrained``'s, for dp_shard=2, tp=2 and dp_shard=2 x tp=2 (world 4), tied and untied,
with a sharded safetensors folder. A folder that does not match its config is refused in one line."""

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh

from spmd_rl.distributed.parallelize import apply_fsdp
from spmd_rl.distributed.tensor_parallel import apply_tp
from spmd_rl.errors import UserError
from spmd_rl.models import ModelArgs, build_model
from spmd_rl.models.decoder import Transformer
from spmd_rl.models.hf_io import load_pretrained, read_hf_config, save_pretrained
from spmd_rl.models.sharded_load import materialise_from_hf
from spmd_rl.rollout.weight_sync import iter_full_tensors
from spmd_rl.trainer.policy import PolicyModel
from tests.distributed.launcher import run_on_ranks

torch.set_num_threads(1)
pytestmark = pytest.mark.slow

UNTIED = ModelArgs(architecture="LlamaForCausalLM", model_type="llama", vocab_size=61, hidden_size=32,
                   intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
TIED = UNTIED.replace(architecture="Qwen2ForCausalLM", model_type="qwen2", tie_word_embeddings=True,
                      attention_bias=True)
LAYOUTS = {"dp2": (2, 1), "tp2": (1, 2), "dp2_tp2": (2, 2)}  # (dp_shard, tp)


def _worker(rank, world_size, folder, dp, tp, out_path):
    mesh = init_device_mesh("cpu", (dp, tp), mesh_dim_names=("dp_shard", "tp"))
    args = ModelArgs.from_hf_config(read_hf_config(folder))
    with torch.device("meta"):
        decoder = Transformer(args)
    if tp > 1:
        apply_tp(decoder, mesh["tp"])
    policy = apply_fsdp(PolicyModel(decoder), mesh["dp_shard"])
    materialise_from_hf(policy, decoder, folder, "cpu")
    assert not any(p.is_meta for p in policy.parameters())
    if args.tie_word_embeddings:
        assert decoder.lm_head.weight is decoder.model.embed_tokens.weight
    full = {name: t.clone() for name, t in iter_full_tensors(decoder)}  # a collective: every rank
    if rank == 0:
        torch.save(full, out_path)


@pytest.mark.parametrize("args", [UNTIED, TIED], ids=["untied", "tied"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_sharded_load_equals_load_pretrained(tmp_path, args, layout):
    dp, tp = LAYOUTS[layout]
    folder = tmp_path / "model"
    save_pretrained(build_model(None, args=args, seed=3), args, folder, max_shard_bytes=16384)  # several files
    run_on_ranks(_worker, dp * tp, str(folder), dp, tp, str(tmp_path / "out.pt"))
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    want = dict(load_pretrained(folder).named_parameters())
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name


def test_a_folder_that_does_not_match_its_config_is_refused(tmp_path, process_group):
    folder = tmp_path / "model"
    save_pretrained(build_model(None, args=UNTIED, seed=0), UNTIED, folder)
    wider = UNTIED.replace(intermediate_size=96)
    with torch.device("meta"):
        decoder = Transformer(wider)
    with pytest.raises(UserError) as err:
        materialise_from_hf(decoder, decoder, folder, "cpu")
    # safetensors lists names sorted: down_proj is the first MLP weight read
    assert str(err.value) == (f"weights in {folder} do not match its config.json: shape (32, 64) for the parameter "
                              "model.layers.0.mlp.down_proj.weight (config: (32, 96)); check that config.json "
                              "belongs to these weights")
    deeper = UNTIED.replace(num_layers=3)
    with torch.device("meta"):
        decoder = Transformer(deeper)
    with pytest.raises(UserError, match=r"do not match its config.json: missing \['model.layers.2.input_layernorm"):
        materialise_from_hf(decoder, decoder, folder, "cpu")

"""Data layer: verl-schema datasets, tokenizers, sampler, packing and the prepare scripts."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

torch.set_num_threads(1)

from spmd_rl.data.packing import pack_sequences, split_by_token_budget  # noqa: E402
from spmd_rl.data.parquet_io import read_rows, write_rows  # noqa: E402
from spmd_rl.data.prepare import addition, gsm8k  # noqa: E402
from spmd_rl.data.rl_dataset import RLDataset  # noqa: E402
from spmd_rl.data.sampler import PromptSampler  # noqa: E402
from spmd_rl.data.sft_dataset import SFTDataset  # noqa: E402
from spmd_rl.data.tokenizer import build_char_tokenizer, load_tokenizer  # noqa: E402
from spmd_rl.errors import UserError  # noqa: E402

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
QWEN_TOKENIZER = SHARED / "assets" / "qwen2.5-tokenizer"
GSM8K_SRC = SHARED / "data" / "gsm8k"

# The schema verl's examples/data_preprocess scripts produce (via HF datasets), spelled out.
VERL_SCHEMA = pa.schema(
    [
        ("data_source", pa.string()),
        ("prompt", pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))),
        ("ability", pa.string()),
        ("reward_model", pa.struct([("ground_truth", pa.string()), ("style", pa.string())])),
        ("extra_info", pa.struct([("index", pa.int64()), ("split", pa.string())])),
    ]
)


def verl_row(content: str, answer: str, index: int, *, system: str | None = None) -> dict:
    prompt = ([{"content": system, "role": "system"}] if system else []) + [{"content": content, "role": "user"}]
    return {
        "data_source": "synthetic/addition",
        "prompt": prompt,
        "ability": "arithmetic",
        "reward_model": {"ground_truth": answer, "style": "rule"},
        "extra_info": {"index": index, "split": "train"},
    }


def write_verl(path: Path, rows: list[dict], schema: pa.Schema = VERL_SCHEMA) -> str:
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return str(path)


@pytest.fixture(scope="module")
def char_tok(tmp_path_factory):
    out = tmp_path_factory.mktemp("chartok")
    build_char_tokenizer(str(out))
    return load_tokenizer(str(out))


@pytest.fixture(scope="module")
def char_tok_dir(char_tok):
    return char_tok.name_or_path


# ---------------------------------------------------------------- tokenizers


def test_char_tokenizer_round_trip_and_chat_template(char_tok):
    s = "what is 12 + 3.5 ? #x= -7*2 "
    ids = char_tok.encode(s, add_special_tokens=False)
    assert len(ids) == len(s)  # one id per character
    assert char_tok.decode(ids) == s
    assert char_tok.eos_token == "<|end|>" and char_tok.pad_token == "<|pad|>"
    messages = [{"role": "user", "content": "1+2="}, {"role": "assistant", "content": "3"}]
    text = char_tok.apply_chat_template(messages, tokenize=False)
    assert text == "<|user|>1+2=<|assistant|>3<|end|>"
    gen = char_tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert gen == "<|user|>1+2=<|assistant|>"
    ids = char_tok.apply_chat_template(messages[:1], tokenize=True, add_generation_prompt=True, return_dict=False)
    user, assistant = char_tok.convert_tokens_to_ids(["<|user|>", "<|assistant|>"])
    assert ids == [user] + char_tok.encode("1+2=", add_special_tokens=False) + [assistant]


def test_load_tokenizer_errors(tmp_path, char_tok_dir):
    with pytest.raises(UserError, match=r"tokenizer folder .*nope does not exist"):
        load_tokenizer(str(tmp_path / "nope"))
    bare = tmp_path / "bare"
    shutil.copytree(char_tok_dir, bare)
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)  # older transformers keep the template here instead
    config.pop("pad_token")
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    msg = f"tokenizer at {bare} has no chat_template: set data.chat_template or use an instruct tokenizer"
    with pytest.raises(UserError) as e:
        load_tokenizer(str(bare))
    assert str(e.value) == msg
    loose = load_tokenizer(str(bare), require_chat_template=False)
    assert loose.chat_template is None
    assert (loose.pad_token, loose.pad_token_id) == ("<|end|>", loose.eos_token_id)  # pad falls back to eos
    fixed = load_tokenizer(str(bare), chat_template="{{ messages[0]['content'] }}")
    assert fixed.apply_chat_template([{"role": "user", "content": "7"}], tokenize=False) == "7"


# ---------------------------------------------------------------- RL dataset


def test_rl_dataset_reads_verl_schema(tmp_path, char_tok):
    rows = [verl_row(f"{i}+{i}=", str(2 * i), i) for i in range(5)]
    rows[2] = verl_row("2+2=", "4", 2, system="add")
    f1 = write_verl(tmp_path / "a.parquet", rows)
    # A second file without extra_info (verl treats it as optional) is appended in order.
    schema2 = pa.schema([fld for fld in VERL_SCHEMA if fld.name != "extra_info"])
    row2 = {k: v for k, v in verl_row("9+1=", "10", 0).items() if k != "extra_info"}
    f2 = write_verl(tmp_path / "b.parquet", [row2], schema2)
    ds = RLDataset([f1, f2], char_tok, max_prompt_length=64)
    assert len(ds) == 6 and ds.num_filtered == 0
    for i in range(6):
        s = ds[i]
        ref = char_tok.apply_chat_template(s.raw_prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert s.index == i and s.prompt_ids == ref
    s = ds[2]
    assert s.raw_prompt == [{"content": "add", "role": "system"}, {"content": "2+2=", "role": "user"}]
    assert (s.data_source, s.ground_truth, s.extra_info) == ("synthetic/addition", "4", {"index": 2, "split": "train"})
    assert ds[5].extra_info == {} and ds[5].ground_truth == "10"
    assert char_tok.decode(ds[3].prompt_ids) == "<|user|>3+3=<|assistant|>"


def test_rl_dataset_qwen_chat_template(tmp_path):
    if not QWEN_TOKENIZER.is_dir():
        pytest.skip(f"../shared/assets/qwen2.5-tokenizer not found: {QWEN_TOKENIZER}")
    tok = load_tokenizer(str(QWEN_TOKENIZER))
    rows = [verl_row("What is 2+3?", "5", 0), verl_row("Sum 10 and 7.", "17", 1, system="Be brief.")]
    ds = RLDataset(write_verl(tmp_path / "q.parquet", rows), tok, max_prompt_length=512)
    for s in (ds[0], ds[1]):
        ref = tok.apply_chat_template(s.raw_prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert s.prompt_ids == ref
    text = tok.decode(ds[0].prompt_ids)
    assert text.endswith("<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n")


def test_rl_dataset_filters_overlong(tmp_path, char_tok, capsys):
    # "<|user|>" + content + "<|assistant|>" is len(content) + 2 tokens.
    contents = ["1+1=", "123456789+1=", "2+2=", "99999+99999=", "3+3="]
    path = write_verl(tmp_path / "d.parquet", [verl_row(c, "0", i) for i, c in enumerate(contents)])
    ds = RLDataset(path, char_tok, max_prompt_length=6)
    assert ds.num_filtered == 2 and len(ds) == 3
    assert "filtered 2 of 5 prompts longer than data.max_prompt_length=6" in capsys.readouterr().out
    assert [s.raw_prompt[0]["content"] for s in (ds[0], ds[1], ds[2])] == ["1+1=", "2+2=", "3+3="]
    assert [ds[i].extra_info["index"] for i in range(3)] == [0, 2, 4]  # original rows kept in order
    # Not filtering: an overlong prompt is an error naming the limit, never silently truncated.
    with pytest.raises(UserError) as e:
        RLDataset(path, char_tok, max_prompt_length=6, filter_overlong_prompts=False)
    assert str(e.value) == (
        f"prompt 1 of {path} has 14 tokens > data.max_prompt_length=6: "
        "raise data.max_prompt_length or set data.filter_overlong_prompts=true"
    )
    with pytest.raises(UserError) as e:
        RLDataset(path, char_tok, max_prompt_length=3)
    assert str(e.value) == (
        "all 5 prompts are longer than data.max_prompt_length=3 (the shortest has 6 tokens): "
        "raise data.max_prompt_length"
    )


def test_rl_dataset_user_errors(tmp_path, char_tok):
    messages = []

    def error_of(*args, **kwargs) -> str:
        with pytest.raises(UserError) as e:
            RLDataset(*args, **kwargs)
        messages.append(str(e.value))
        return str(e.value)

    missing = tmp_path / "missing.parquet"
    assert error_of(str(missing), char_tok).startswith(f"data file {missing} does not exist: check the path")
    empty = write_verl(tmp_path / "empty.parquet", [])
    assert error_of(empty, char_tok) == f"data file {empty} has 0 rows: regenerate it or drop it from the file list"
    bad = tmp_path / "bad.parquet"
    write_rows([{"question": "1+1=", "data_source": "x"}], bad)
    assert error_of(str(bad), char_tok).startswith(
        f"data file {bad} lacks required column(s) prompt, reward_model; found columns: question, data_source"
    )
    not_parquet = tmp_path / "notes.parquet"
    not_parquet.write_text("hello")
    assert error_of(str(not_parquet), char_tok).startswith(f"data file {not_parquet} is not a readable parquet file")
    no_template = load_tokenizer(char_tok.name_or_path)
    no_template.chat_template = None
    good = write_verl(tmp_path / "good.parquet", [verl_row("1+1=", "2", 0)])
    assert error_of(good, no_template) == (
        f"tokenizer at {char_tok.name_or_path} has no chat_template: "
        "set data.chat_template or use an instruct tokenizer"
    )
    assert all("\n" not in m for m in messages)  # every message is one line


# ---------------------------------------------------------------- SFT dataset


def test_sft_loss_mask_covers_response_and_eos(tmp_path, char_tok, capsys):
    rows = [
        {"prompt": [{"role": "user", "content": "12+5="}], "response": "17"},
        {"prompt": [{"role": "user", "content": "999+999="}], "response": "1998"},
    ]
    path = str(write_rows(rows, tmp_path / "sft.parquet"))
    # A file whose prompt column is a plain string: each prompt is one user message.
    plain = str(write_rows([{"prompt": "3+4=", "response": "7"}], tmp_path / "plain.parquet"))
    ds = SFTDataset([path, plain], char_tok, max_length=12)
    assert len(ds) == 2 and ds.num_filtered == 1
    assert "filtered 1 of 3 SFT examples longer than data.max_length=12" in capsys.readouterr().out
    ex = ds[0]
    assert char_tok.decode(ex.input_ids) == "<|user|>12+5=<|assistant|>17<|end|>"
    assert ex.loss_mask == [0] * 7 + [1, 1, 1]
    assert char_tok.decode([t for t, m in zip(ex.input_ids, ex.loss_mask) if m]) == "17<|end|>"
    ex = ds[1]
    assert char_tok.decode(ex.input_ids) == "<|user|>3+4=<|assistant|>7<|end|>"
    assert ex.loss_mask == [0] * 6 + [1, 1]
    with pytest.raises(UserError, match=r"lacks required column\(s\) response; found columns: prompt, answer"):
        SFTDataset(str(write_rows([{"prompt": "1", "answer": "2"}], tmp_path / "b.parquet")), char_tok)
    with pytest.raises(UserError, match=r"^all 3 SFT examples are longer than data.max_length=4 "):
        SFTDataset([path, plain], char_tok, max_length=4)


# ---------------------------------------------------------------- sampler


@pytest.mark.parametrize("dp_size", [1, 2, 4])
def test_sampler_shards_disjoint_and_covering(dp_size):
    n, batch = 37, 8
    samplers = [PromptSampler(n, batch_size=batch, dp_rank=r, dp_size=dp_size, seed=3) for r in range(dp_size)]
    assert samplers[0].steps_per_epoch == 4
    seen = []
    for _ in range(4):
        reference = samplers[0].global_indices()
        shards = [s.next_indices() for s in samplers]
        assert [len(x) for x in shards] == [batch // dp_size] * dp_size
        assert sum(shards, []) == reference  # rank order concatenates to the global batch
        assert len(set(reference)) == batch
        seen += reference
    assert len(set(seen)) == 32 and set(seen) <= set(range(n))  # one epoch never repeats a prompt
    assert all(s.epoch == 1 and s.position == 0 for s in samplers)


def test_sampler_deterministic_by_seed_and_rolls_over():
    def draw(seed, steps=6, shuffle=True):
        s = PromptSampler(10, batch_size=4, dp_rank=0, dp_size=1, seed=seed, shuffle=shuffle)
        return [s.next_indices() for _ in range(steps)]

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)
    s = PromptSampler(10, batch_size=4, dp_rank=0, dp_size=1, seed=7)
    epoch0 = [s.next_indices(), s.next_indices()]
    assert (s.epoch, s.position) == (1, 0)  # 10 // 4 = 2 steps, the partial batch is dropped
    epoch1 = [s.next_indices(), s.next_indices()]
    assert epoch0 != epoch1  # a new permutation (seed + epoch) each epoch
    assert epoch0 == draw(7)[:2] and epoch1 == draw(7)[2:4]
    assert draw(0, steps=3, shuffle=False) == [[0, 1, 2, 3], [4, 5, 6, 7], [0, 1, 2, 3]]


def test_sampler_resume_mid_epoch():
    a = PromptSampler(50, batch_size=6, dp_rank=1, dp_size=2, seed=11)
    for _ in range(5):
        a.next_indices()
    state = a.state_dict()
    expected = [a.next_indices() for _ in range(12)]  # crosses into epoch 2
    b = PromptSampler(50, batch_size=6, dp_rank=1, dp_size=2, seed=11)
    b.load_state_dict(state)
    assert (b.epoch, b.position) == (0, 5)
    assert [b.next_indices() for _ in range(12)] == expected
    # The global order is dp-independent, so a resume with another dp size keeps the batches.
    c = PromptSampler(50, batch_size=6, dp_rank=0, dp_size=1, seed=11)
    c.load_state_dict(state)
    assert c.next_indices()[3:] == expected[0]
    with pytest.raises(UserError, match=r"cannot resume the prompt sampler \(num_items: checkpoint 50 vs now 49\)"):
        PromptSampler(49, batch_size=6, dp_rank=0, dp_size=1, seed=11).load_state_dict(state)


def test_sampler_batch_larger_than_dataset():
    with pytest.raises(UserError) as e:
        PromptSampler(5, batch_size=8, dp_rank=0, dp_size=1)
    assert str(e.value) == (
        "data.train_batch_size=8 exceeds the 5 prompts in the dataset: lower data.train_batch_size or add data"
    )


# ---------------------------------------------------------------- packing


def test_pack_sequences():
    packed = pack_sequences([[5, 6, 7], [8], [9, 10]])
    assert packed.input_ids.tolist() == [[5, 6, 7, 8, 9, 10]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 0, 0, 1]]
    assert packed.cu_seqlens.tolist() == [0, 3, 4, 6] and packed.cu_seqlens.dtype == torch.int32
    assert packed.input_ids.dtype == torch.int64 and packed.seqlens == [3, 1, 2]


def test_split_by_token_budget():
    assert split_by_token_budget([3, 4, 2, 5, 1], 7) == [[0, 1], [2, 3], [4]]
    assert split_by_token_budget([2, 9, 2, 2], 5) == [[0], [1], [2, 3]]  # 9 > 5 gets its own group
    assert split_by_token_budget([5, 5, 5], 5) == [[0], [1], [2]]
    assert split_by_token_budget([], 5) == []


# ---------------------------------------------------------------- prepare scripts


def test_prepare_gsm8k_real_data(tmp_path):
    if not GSM8K_SRC.is_dir():
        pytest.skip(f"../shared/data/gsm8k not found: {GSM8K_SRC}")
    counts = gsm8k.prepare_gsm8k(GSM8K_SRC, tmp_path)
    assert counts == {"train": 7473, "test": 1319}
    test_rows = read_rows(tmp_path / "test.parquet")
    row = test_rows[0]
    assert row["reward_model"] == {"style": "rule", "ground_truth": "18"}
    assert (row["data_source"], row["ability"]) == ("openai/gsm8k", "math")
    question = row["extra_info"]["question"]
    assert row["prompt"] == [
        {"role": "user", "content": question + ' Let\'s think step by step and output the final answer after "####".'}
    ]
    assert (row["extra_info"]["split"], row["extra_info"]["index"]) == ("test", 0)
    assert row["extra_info"]["answer"].endswith("#### 18")
    assert gsm8k.extract_solution("so\n#### 1,234") == "1234"


def test_prepare_gsm8k_missing_src(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        gsm8k.main(["--src", str(tmp_path / "absent"), "--out", str(tmp_path / "out")])
    assert e.value.code == 2
    assert f"error: --src {tmp_path / 'absent'} does not exist" in capsys.readouterr().err


def test_prepare_addition(tmp_path, char_tok):
    rows = addition.make_addition_rows(50, 1, 2, random.Random(0))
    assert rows == addition.make_addition_rows(50, 1, 2, random.Random(0))
    for r in rows:
        a, b = r["extra_info"]["a"], r["extra_info"]["b"]
        assert 0 <= a < 100 and 0 <= b < 100
        assert r["prompt"] == [{"role": "user", "content": f"{a}+{b}="}]
        assert r["reward_model"] == {"style": "rule", "ground_truth": str(a + b)}
    assert rows[0]["data_source"] == "synthetic/addition" and rows[0]["ability"] == "arithmetic"

    out, tok_dir = tmp_path / "add", tmp_path / "tok"
    addition.main(["--out", str(out), "--num-train", "300", "--num-test", "40", "--max-digits", "1",
                   "--tokenizer-out", str(tok_dir)])  # fmt: skip
    train, test = read_rows(out / "train.parquet"), read_rows(out / "test.parquet")
    assert (len(train), len(test)) == (300, 40)
    pairs = lambda rs: {(r["extra_info"]["a"], r["extra_info"]["b"]) for r in rs}  # noqa: E731
    assert len(pairs(test)) == 40 and not pairs(test) & pairs(train)
    assert [r["extra_info"]["index"] for r in test] == list(range(40)) and test[0]["extra_info"]["split"] == "test"
    sft = read_rows(out / "sft_train.parquet")
    assert sft[0] == {"prompt": train[0]["prompt"], "response": train[0]["reward_model"]["ground_truth"]}
    # The written files load with the saved tokenizer, end to end.
    tok = load_tokenizer(str(tok_dir))
    assert len(RLDataset(str(out / "test.parquet"), tok, max_prompt_length=8)) == 40
    assert len(SFTDataset(str(out / "sft_train.parquet"), tok, max_length=10)) == 300
    with pytest.raises(UserError, match=r"^only 100 distinct 1..1-digit pairs are left for 101 test rows"):
        addition.make_addition_rows(101, 1, 1, random.Random(0), split="test", unique=True)

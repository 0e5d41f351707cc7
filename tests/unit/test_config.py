"""Config loading: unknown keys, types, cross-field rules, precedence, resolved YAML."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from spmd_rl.config import Config, SFTConfig, check_world_size, load_config, parse_cli, save_config
from spmd_rl.config_loader import ConfigError
from spmd_rl.errors import UserError

torch.set_num_threads(1)

REQUIRED = ["model.path=/m", "data.train_files=[t.parquet]"]


def write_yaml(tmp_path, data) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def problems(overrides, path=None, cls=Config) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(cls, path, overrides)
    return info.value.problems


def test_unknown_key_has_dotted_path_and_suggestion():
    (line,) = problems(REQUIRED + ["actor.optim.lrr=1e-5"])
    assert line.startswith("actor.optim.lrr: unknown key — did you mean 'actor.optim.lr'?")


def test_unknown_section_suggestion():
    (line,) = problems(REQUIRED + ["trainr.total_steps=3"])
    assert "trainr: unknown key — did you mean 'trainer'?" in line


def test_wrong_type_names_key_expected_and_given():
    (line,) = problems(REQUIRED + ["rollout.n=four"])
    assert line == "rollout.n: expected int, got str ('four')"


def test_int_widens_to_float_but_bool_is_not_int():
    cfg = load_config(Config, None, REQUIRED + ["actor.optim.lr=1"])
    assert cfg.actor.optim.lr == 1.0 and isinstance(cfg.actor.optim.lr, float)
    assert problems(REQUIRED + ["rollout.n=true"]) == ["rollout.n: expected int, got bool (True)"]


def test_exponent_without_dot_is_a_float():
    cfg = load_config(Config, None, REQUIRED + ["actor.optim.lr=1e-6"])
    assert cfg.actor.optim.lr == 1e-6
    assert problems(REQUIRED + ["actor.optim.lr=fast"]) == ["actor.optim.lr: expected float, got str ('fast')"]


def test_literal_choices_listed():
    (line,) = problems(REQUIRED + ["actor.loss_agg_mode=mean"])
    assert line.startswith("actor.loss_agg_mode: 'mean' is not one of 'token-mean'")


def test_all_errors_reported_together():
    lines = problems(["rollout.n=x", "actor.optim.lrr=1", "critic.foo=2"])
    assert len(lines) == 3
    assert {line.split(":")[0] for line in lines} == {"rollout.n", "actor.optim.lrr", "critic.foo"}


def test_cross_field_rule_names_the_fixing_key():
    lines = problems(REQUIRED + ["data.train_batch_size=6", "actor.ppo_mini_batch_size=4"])
    assert lines == ["actor.ppo_mini_batch_size: 4 must divide data.train_batch_size=6"]
    lines = problems(REQUIRED + ["rollout.n=1"])
    assert lines[0].startswith("rollout.n: algorithm.adv_estimator=grpo compares the n responses")


def test_section_rule_prefixed_with_section_path():
    lines = problems(REQUIRED + ["actor.optim.lr=-1", "rollout.top_p=0"])
    assert sorted(lines) == ["actor.optim.lr: must be > 0", "rollout.top_p: must be in (0, 1]"]


def test_missing_required_fields():
    lines = problems([])
    assert lines == ["model.path: is required: an HF model folder (config.json + safetensors)",
                     "data.train_files: is required: a list of parquet files"]


def test_world_size_rule():
    cfg = load_config(Config, None, REQUIRED + ["data.train_batch_size=6", "actor.ppo_mini_batch_size=6"])
    with pytest.raises(ConfigError) as info:
        check_world_size(cfg, 4)
    assert info.value.problems[0] == (
        "data.train_batch_size: 6 must be divisible by the data-parallel size 4 (WORLD_SIZE / tp / sp / pp)")
    check_world_size(cfg, 2)


def test_precedence_cli_over_yaml_over_default(tmp_path):
    path = write_yaml(tmp_path, {"model": {"path": "/yaml"}, "data": {"train_files": ["a"], "train_batch_size": 16},
                                 "actor": {"ppo_mini_batch_size": 16}})
    cfg = load_config(Config, path, ["model.path=/cli"])
    assert cfg.model.path == "/cli"  # CLI beats YAML
    assert cfg.data.train_batch_size == 16  # YAML beats default
    assert cfg.rollout.n == 4  # default
    assert cfg.model.tokenizer_path == "/cli"  # derived default follows the final value


def test_parse_cli_accepts_both_override_spellings():
    path, overrides = parse_cli(["--config", "x.yaml", "a.b=1", "--c.d=2"])
    assert path == "x.yaml" and overrides == ["a.b=1", "c.d=2"]


def test_missing_config_file_is_one_line(tmp_path):
    with pytest.raises(UserError, match="config file .*nope.yaml does not exist"):
        load_config(Config, str(tmp_path / "nope.yaml"), [])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(Config, None, REQUIRED + ["rollout.n=8", "actor.clip_ratio_high=0.28"])
    save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(Config, str(tmp_path / "run" / "config.yaml"), [])
    assert again == cfg
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["rollout"]["n"] == 8


def test_sft_config_has_own_sections():
    cfg = load_config(SFTConfig, None, ["model.path=/m", "data.train_files=[a]", "optim.lr=0.01"])
    assert cfg.optim.lr == 0.01
    assert problems(["model.path=/m", "data.train_files=[a]", "data.max_prompt_length=3"], cls=SFTConfig)[0].startswith(
        "data.max_prompt_length: unknown key")


def test_cli_errors_print_one_line_each_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "spmd_rl.train", "rollout.n=x", "actor.optim.lrr=1"],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr
    assert lines == ["error: rollout.n: expected int, got str ('x')",
                     "error: actor.optim.lrr: unknown key — did you mean 'actor.optim.lr'? "
                     "(valid: lr, weight_decay, betas, eps, warmup_steps, lr_schedule, min_lr_ratio, grad_clip)"]


BASE = ["model.path=m", "data.train_files=[t.parquet]"]


@pytest.mark.parametrize("overrides, line", [
    (["algorithm.adv_estimator=gea"], "algorithm.adv_estimator: unknown 'gea'; choose from ['gae', 'gpg', 'grpo'"),
    (["algorithm.adv_estimator=gae"], "critic.enable: algorithm.adv_estimator=gae needs a value model: set critic.enable=true"),
    (["actor.policy_loss=ppo"], "actor.policy_loss: unknown 'ppo'; choose from ['cispo', 'clip_cov', 'gpg', 'gspo', 'kl_cov', 'vanilla']"),
    (["actor.kl_loss_type=k4"], "actor.kl_loss_type: unknown 'k4'; choose from"),
    (["algorithm.kl_penalty=k9+"], "algorithm.kl_penalty: unknown 'k9+'"),
    (["reward.overlong_buffer.enable=true", "reward.overlong_buffer.len=0"], "reward.overlong_buffer.len: must be > 0"),
    (["reward.overlong_buffer.enable=true", "reward.overlong_buffer.len=600"], "reward.overlong_buffer.len: 600 must be < data.max_response_length=512"),
    (["algorithm.filter_groups.enable=true", "rollout.n=1", "algorithm.adv_estimator=remax"], "rollout.n: algorithm.filter_groups drops groups"),
    (["algorithm.adv_estimator=rloo", "rollout.n=1"], "rollout.n: algorithm.adv_estimator=rloo compares the n responses"),
    (["critic.warmup_steps=3"], "critic.warmup_steps: only applies with critic.enable=true"),
    (["algorithm.kl_ctrl.type=adaptive", "algorithm.kl_ctrl.horizon=0"], "algorithm.kl_ctrl.horizon: must be > 0"),
    (["actor.kl_loss_type=low_var_kl++"], "actor.kl_loss_type: unknown 'low_var_kl++'"),
    (["actor.policy_loss_options.clip_cov_ratio=0"], "actor.policy_loss_options.clip_cov_ratio: must be > 0"),
    (["rollout.temperature=0"], "rollout.temperature: must be > 0"),
    (["critic.enable=true"], "critic.enable: only algorithm.adv_estimator=gae uses the critic's values"),
    (["algorithm.filter_groups.metric=acc_mean"], "algorithm.filter_groups.metric"),
])
def test_algorithm_rules_are_one_line_each(overrides, line):
    lines = problems(BASE + overrides)
    assert any(l.startswith(line) for l in lines), lines


def test_reference_model_is_loaded_only_for_kl_terms():
    assert not load_config(Config, None, BASE).needs_reference
    assert load_config(Config, None, BASE + ["actor.use_kl_loss=true"]).needs_reference
    assert load_config(Config, None, BASE + ["algorithm.use_kl_in_reward=true"]).needs_reference


def test_every_shipped_config_loads():
    for path in sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml")):
        cls = SFTConfig if path.name.startswith("sft_") else Config
        load_config(cls, str(path), ["model.path=m"])

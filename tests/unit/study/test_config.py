"""Study config loading (`harness.study.config`, `pipeline.load_config`): types, unknown keys
with suggestions, TOML locations, options per family, path resolution."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from harness.study import config, pipeline
from harness.errors import HarnessError

HF = '[[models]]\nname = "m"\nfamily = "hf"\nckpt = "tiny:paligemma"\n'


def load(tmp_path: Path, text: str):
    path = tmp_path / "study.toml"
    path.write_text(text)
    return pipeline.load_config(path)


def error(tmp_path: Path, text: str) -> str:
    with pytest.raises(HarnessError) as info:
        load(tmp_path, text)
    return str(info.value)


def test_a_good_config_loads_with_defaults_and_resolved_paths(tmp_path):
    study = load(tmp_path, 'data_dir = "data"\n' + HF + 'options = { layers = [0, -1], '
                 'batch_size = 2 }\n[[models]]\nname = "ext"\nfeats = "x/feats_A.pt"\n')
    assert study.data_dir == tmp_path / "data"
    assert study.output_dir == tmp_path / "harness_out" / "study"
    assert (study.ks, study.permutations, study.seed) == ([5, 10, 20], 200, 0)
    assert study.zscore_states is False and study.drop_empty_tasks is False
    m, ext = study.models
    assert (m.family, m.ckpt, m.python) == ("hf", "tiny:paligemma", sys.executable)
    assert m.options == {"layers": "0,-1", "batch_size": 2}  # only what was given
    assert ext.feats == tmp_path / "x" / "feats_A.pt" and ext.family is None
    assert study.config_path == tmp_path / "study.toml"


def test_output_dir_argument_wins(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text('data_dir = "d"\noutput_dir = "o"\n' + HF)
    assert pipeline.load_config(path, output_dir=Path("/elsewhere")).output_dir == Path("/elsewhere")


@pytest.mark.parametrize("line,needle", [
    ('zscore_states = "false"', "zscore_states: Input should be a valid boolean (got 'false')"),
    ("drop_empty_tasks = 1", "drop_empty_tasks: Input should be a valid boolean"),
    ('k_values = "5"', "k_values: Input should be a valid list"),
    ("k_values = [5, 0]", "k_values[1]: Input should be greater than or equal to 1"),
    ("k_values = [5.0]", "k_values[0]: Input should be a valid integer"),
    ("k_values = []", "k_values: List should have at least 1 item"),
    ("permutations = -5", "permutations: Input should be greater than or equal to 0"),
    ('seed = "1"', "seed: Input should be a valid integer"),
    ("k_value = [5]", "k_value: unknown key (did you mean 'k_values'?)"),
    ("zzz = 1", "zzz: unknown key"),
])
def test_top_level_problems_name_the_key(tmp_path, line, needle):
    assert needle in error(tmp_path, f'data_dir = "d"\n{line}\n' + HF)


@pytest.mark.parametrize("model,needle", [
    ('options = { batchsize = 4 }', "models[0].options.batchsize: unknown key (did you mean 'batch_size'?)"),
    ('options = { batch_size = "4" }', "models[0].options.batch_size: Input should be a valid integer"),
    ('options = { chat_template = "false" }', "models[0].options.chat_template: Input should be a valid boolean"),
    ('options = { tokens = "al" }', "models[0].options.tokens: Input should be 'all', 'image' or 'text'"),
    ('options = { layers = "middle" }', "models[0].options.layers: layers must be 'last', 'all'"),
    ('options = { unnorm_key = "x" }', "models[0].options.unnorm_key: unknown key"),
    ('options = 3', "models[0].options: Input should be a valid dictionary"),
    ('ckpts = "x"', "models[0].ckpts: unknown key (did you mean 'ckpt'?)"),
])
def test_model_problems_carry_their_toml_location(tmp_path, model, needle):
    assert needle in error(tmp_path, 'data_dir = "d"\n' + HF + model + "\n")


def test_options_follow_the_family(tmp_path):
    text = ('data_dir = "d"\n[[models]]\nname = "s"\nfamily = "spatialvla"\nckpt = "tiny"\n'
            'options = { unnorm_key = "fractal20220817_data/0.1.0" }\n')
    assert load(tmp_path, text).models[0].options == {"unnorm_key": "fractal20220817_data/0.1.0"}
    bad = text.replace("spatialvla", "pi0_lerobot")
    assert "models[0].options.unnorm_key: unknown key" in error(tmp_path, bad)


@pytest.mark.parametrize("model,needle", [
    ('[[models]]\nname = "m"\nfamily = "spatialvlaa"\nckpt = "x"\n',
     "models[0].family: unknown family 'spatialvlaa' (did you mean 'spatialvla'?)"),
    ('[[models]]\nname = "m"\nfamily = "hf"\n', "models[0]: needs family and ckpt"),
    ('[[models]]\nname = "m"\nfeats = "f.pt"\nfamily = "hf"\n', "drop ['family']"),
    ('[[models]]\nname = "a/b"\nfeats = "f.pt"\n', "models[0].name: 'a/b' is not a folder name"),
    ('[[models]]\nname = "m"\nfeats = "f.pt"\n[[models]]\nname = "m"\nfeats = "g.pt"\n',
     "models: model names used twice: ['m']"),
])
def test_model_rows_are_checked(tmp_path, model, needle):
    assert needle in error(tmp_path, 'data_dir = "d"\n' + model)


def test_every_problem_is_reported_at_once(tmp_path):
    msg = error(tmp_path, 'permutations = -1\nzscore_states = "no"\n' + HF +
                'options = { batchsize = 1, tokens = "x" }\n')
    assert msg.count(";") == 4 and "5 problem(s)" in msg
    assert "data_dir: Field required" in msg and "\n" not in msg.strip()


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(HarnessError, match="config file not found"):
        pipeline.load_config(tmp_path / "nope.toml")
    assert "not valid TOML" in error(tmp_path, "data_dir = \n")
    assert "models: Field required" in error(tmp_path, 'data_dir = "d"\n')


def test_the_demo_is_built_from_the_registry(tmp_path):
    from harness.extractors.engine.registry import families
    study = pipeline.default_study(tmp_path)
    want = [(name, spec.name, ckpt) for spec in families().values() for name, ckpt, _ in spec.demo]
    assert [(m.name, m.family, m.ckpt) for m in study.models] == want
    assert study.stand_ins and study.synthetic == {"n": 200, "seed": 0}


def test_k_is_checked_against_n(tmp_path):
    study = load(tmp_path, 'data_dir = "d"\nk_values = [5, 40]\n' + HF)
    pipeline.check_against_data(study, 50)
    with pytest.raises(HarnessError, match=r"k_values\[1\] = 40: must be in \[1, N-1\] = \[1, 39\]"):
        pipeline.check_against_data(study, 40)


def test_paths_are_all_checked_at_once(tmp_path):
    study = load(tmp_path, 'data_dir = "d"\n[[models]]\nname = "e"\nfeats = "f.pt"\n'
                 '[[models]]\nname = "m"\nfamily = "hf"\nckpt = "tiny"\npython = "/no/python"\n')
    with pytest.raises(HarnessError) as info:
        pipeline.check_paths(study)
    msg = str(info.value)
    assert "3 problem(s)" in msg and "data_dir" in msg and "models[0] ('e').feats" in msg
    assert "models[1] ('m').python /no/python" in msg


def test_the_top_level_keys_are_the_documented_ones():
    """README documents these keys; a new key is one field of StudyConfig."""
    assert set(config.StudyConfig.model_fields) == {
        "data_dir", "output_dir", "k_values", "permutations", "seed", "zscore_states",
        "drop_empty_tasks", "group_by", "compare", "horizons", "threads", "models"}


def test_split_modalities_and_action_repr_are_per_model_options(tmp_path):
    text = ('data_dir = "d"\n[[models]]\nname = "p"\nfamily = "pi0_lerobot"\nckpt = "tiny"\n'
            'options = { split_modalities = true, action_repr = true }\n')
    assert load(tmp_path, text).models[0].options == {"split_modalities": True,
                                                      "action_repr": True}
    assert pipeline._flags(load(tmp_path, text).models[0].options) == [
        "--split_modalities", "--action_repr"]
    bad = text.replace("pi0_lerobot", "spatialvla")
    assert ("models[0].options.action_repr: family 'spatialvla' has no action stream"
            in error(tmp_path, bad))
    assert "split_modalities" in error(tmp_path, text.replace("true, action", '"yes", action'))

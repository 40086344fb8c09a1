"""`--split_modalities` on every family's stand-in: the image mask is exactly the image
tokens, the text mask exactly the task's tokens, both pooled from the same forward as
feats_A; feats_A.pt is bit-identical with and without the split; empty tasks are recorded,
never a zero vector."""
from __future__ import annotations

import contextlib
import json

import pytest
import torch

from harness.cli import main
from harness.extractors import tiny
from harness.extractors.engine.registry import Common, get
from harness.extractors.engine.features import extract
from tests.random_samples import TASKS, random_samples

STAND_INS = [("spatialvla", "tiny"), ("pi0_lerobot", "tiny"), ("pi0_lerobot", "tiny:new"),
             ("starvla", "tiny:qwen2_5_vl"), ("starvla", "tiny:qwen3_vl"),
             ("hf", "tiny:paligemma"), ("hf", "tiny:paligemma2")]


def params():
    out = []
    for family, ckpt in STAND_INS:
        needs = ckpt.split(":")[1] if family in ("starvla", "hf") else None
        reason = tiny.unavailable(needs) if needs else None
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        out.append(pytest.param(family, ckpt, marks=marks, id=f"{family}-{ckpt}"))
    return out


@contextlib.contextmanager
def loaded(family, ckpt, **opts):
    spec = get(family)
    common = Common(ckpt=ckpt, device="cpu", dtype="float32", layers="last", revision=None,
                    tiny=True)
    with contextlib.ExitStack() as stack:
        yield spec.build(common, {o.name: opts.get(o.name, o.default) for o in spec.options},
                         stack).load()


def image_positions(ex, inputs, valid):
    """Where the image tokens are, read independently of harness.extractors.engine.modality."""
    if "lang_tokens" in inputs:  # Pi0: image embeddings come first in the prefix
        n_image = valid.shape[1] - inputs["lang_tokens"].shape[1]
        out = torch.zeros_like(valid)
        out[:, :n_image] = True
        return out & valid
    return inputs["input_ids"] == tiny.IMAGE_TOKEN


def prompt_ids(inputs, valid):
    if "lang_tokens" in inputs:
        lang = inputs["lang_tokens"]
        return torch.cat([lang.new_full((lang.shape[0], valid.shape[1] - lang.shape[1]), -1),
                          lang], dim=1)
    return inputs["input_ids"]


@pytest.mark.parametrize("family,ckpt", params())
def test_masks_select_exactly_image_and_task_tokens(family, ckpt):
    samples = random_samples()
    with loaded(family, ckpt) as ex:
        inputs = ex.build_inputs(samples)
        hidden = ex.forward(inputs)
        masks = ex.modality_masks(inputs, [s[2] for s in samples], hidden)
        tok = ex.tokenizer
    valid = hidden.mask
    want_image = image_positions(ex, inputs, valid)
    assert torch.equal(masks.image, want_image)
    assert int(masks.image[0].sum()) > 0
    ids = prompt_ids(inputs, valid)
    for row, task in enumerate(TASKS):
        picked = ids[row][masks.text[row]].tolist()
        if task:
            assert masks.text_fallback[row] is None
            assert tok.decode(picked) == task  # exactly the task, nothing around it
            where = masks.text[row].nonzero().flatten()
            assert (where.diff() == 1).all()  # one contiguous span
        else:
            assert masks.text_fallback[row] == "empty_task"
            assert torch.equal(masks.text[row], valid[row] & ~want_image[row])
    assert not (masks.image & masks.text).any()
    assert not (masks.image & ~valid).any() and not (masks.text & ~valid).any()


@pytest.mark.parametrize("family,ckpt", params())
def test_split_files_pool_the_same_forward_and_leave_feats_A_bit_identical(family, ckpt, tmp_path):
    samples = random_samples()
    with loaded(family, ckpt) as ex:
        plain = extract(ex, samples, tmp_path / "plain", batch_size=2, progress=False)
        split = extract(ex, samples, tmp_path / "split", batch_size=2, progress=False,
                        split_modalities=True)
        inputs = ex.build_inputs(samples)
        hidden = ex.forward(inputs)
    a = torch.load(tmp_path / "plain" / "feats_A.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "feats_A.pt", weights_only=True)
    assert torch.equal(a, b) and torch.equal(plain["last"], split["last"])
    assert not (tmp_path / "plain" / "feats_A_img.pt").exists()
    img = torch.load(tmp_path / "split" / "feats_A_img.pt", weights_only=True)
    txt = torch.load(tmp_path / "split" / "feats_A_txt.pt", weights_only=True)
    assert img.shape == txt.shape == a.shape and img.dtype == torch.float32
    # dense reference: plain means over the independently located tokens of a full-batch
    # forward (batching moves values by ~1e-7, hence the tolerance)
    h, valid = hidden.layers["last"].float(), hidden.mask
    want_image = image_positions(ex, inputs, valid)
    ids = prompt_ids(inputs, valid)
    for row, task in enumerate(TASKS):
        torch.testing.assert_close(img[row], h[row][want_image[row]].mean(0), rtol=1e-5, atol=1e-5)
        if task:
            span = [i for i in range(ids.shape[1]) if valid[row, i] and not want_image[row, i]]
            seq = ids[row, span].tolist()
            pattern = ex.tokenizer.encode(task, add_special_tokens=False)
            start = next(s for s in range(len(seq)) if seq[s:s + len(pattern)] == pattern)
            positions = span[start:start + len(pattern)]
            torch.testing.assert_close(txt[row], h[row, positions].mean(0), rtol=1e-5, atol=1e-5)
    meta = json.loads((tmp_path / "split" / "extraction_metadata.json").read_text())
    assert meta["extra_files"] == ["feats_A_img.pt", "feats_A_txt.pt"]
    assert meta["txt_fallback"]["samples"] == {"empty_task": [TASKS.index("")]}
    assert "split_modalities" in meta and "split_modalities" not in json.loads(
        (tmp_path / "plain" / "extraction_metadata.json").read_text())


@pytest.mark.parametrize("seed_compat", [False, True])
def test_an_empty_tasks_text_row_is_undefined_and_zero_only_for_the_seed(tmp_path, seed_compat):
    """A text view of an empty task is undefined: NaN in feats_A_txt.pt (so nothing can
    use it unnoticed), the seed's zero vector only under --seed_compat; listed either way."""
    samples = random_samples()
    with loaded("spatialvla", "tiny", seed_compat=seed_compat) as ex:
        extract(ex, samples, tmp_path, batch_size=4, progress=False, split_modalities=True)
    txt = torch.load(tmp_path / "feats_A_txt.pt", weights_only=True)
    empty = TASKS.index("")
    others = [r for r in range(len(TASKS)) if r != empty]
    assert torch.isfinite(txt[others]).all() and (txt[others].abs().sum(1) > 0).all()
    if seed_compat:
        assert torch.equal(txt[empty], torch.zeros_like(txt[empty]))
    else:
        assert torch.isnan(txt[empty]).all()
    meta = json.loads((tmp_path / "extraction_metadata.json").read_text())
    assert meta["txt_empty_task"]["samples"] == [empty] and meta["txt_empty_task"]["count"] == 1
    assert meta["txt_empty_task"]["rule"].startswith("zero rows" if seed_compat else "NaN rows")
    assert meta["txt_fallback"]["count"] == 1


def test_text_view_cknna_is_over_the_samples_with_a_task(tmp_path):
    """The text view is compared with the states (and the other views) on the samples that
    have a task only, and says on how many."""
    from harness import data as data_mod
    from harness.data import states as states_mod
    from harness.cknna import views
    from harness.io import load_features
    from harness.data.synth import generate
    data_dir, out = tmp_path / "d", tmp_path / "o"
    generate(data_dir, n=16, seed=0, progress=False)
    assert main(["extract", "spatialvla", "--ckpt", "tiny", "--data_dir", str(data_dir),
                 "--output_dir", str(out), "--split_modalities"]) == 0
    data = data_mod.load(data_dir)
    empty = [i for i, t in enumerate(data.tasks) if not t.strip()]
    assert empty, "the synthetic data should hold an empty task"
    rows = lambda p, d: states_mod.normalised(p, d.take(load_features(p)))  # noqa: E731
    by_view, defined = views.load_views(out / "feats_A.pt", data, rows)
    keep = torch.tensor([i not in empty for i in range(data.n)])
    assert torch.equal(defined["text"], keep)
    states = states_mod.l2_rows(data.states)
    full = rows(out / "feats_A.pt", data)
    result = views.compare_views({"full": full, **by_view}, states, [2], defined=defined)
    assert result["samples"] == {"full": data.n, "image": data.n, "text": int(keep.sum())}
    text = states_mod.l2_rows(torch.load(out / "feats_A_txt.pt", weights_only=True)[keep])
    want = views.compare_views({"text": text, "full": full[keep]}, states[keep], [2])
    assert result["against_states"]["text"] == want["against_states"]["text"]
    assert result["pairs"]["full~text"] == want["pairs"]["full~text"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from harness.data.synth import generate
    root = tmp_path_factory.mktemp("data") / "d"
    generate(root, n=5, seed=0, progress=False)
    return root


def test_cli_flag_writes_the_split(data_dir, tmp_path):
    out = tmp_path / "o"
    assert main(["extract", "spatialvla", "--ckpt", "tiny", "--data_dir", str(data_dir),
                 "--output_dir", str(out), "--split_modalities"]) == 0
    assert (out / "feats_A_img.pt").is_file() and (out / "feats_A_txt.pt").is_file()


@pytest.mark.parametrize("family,ckpt", [("spatialvla", "tiny"), ("starvla", "tiny"),
                                         ("hf", "tiny:paligemma")])
def test_action_repr_is_refused_by_families_without_an_action_stream(family, ckpt, data_dir,
                                                                      tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["extract", family, "--ckpt", ckpt, "--data_dir", str(data_dir),
                 "--output_dir", str(out), "--action_repr"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].count(family) >= 1 and "no action stream" in err[0]
    assert not (out / "feats_A.pt").exists()


def test_a_model_without_image_tokens_refuses_the_split(data_dir, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["extract", "hf", "--ckpt", "tiny:gemma", "--data_dir", str(data_dir),
                 "--output_dir", str(out), "--split_modalities"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "image token id" in err[0] and "split_modalities" in err[0]
    assert not (out / "feats_A.pt").exists()

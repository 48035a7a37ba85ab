"""The shared pieces: the head registry and configs, optimiser groups the heads declare, the
training utilities both trainers use, and the leaf's file / option / split helpers."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from core.errors import CheckpointError, CrossTVRError, StoreMismatchError, UnknownHeadError, UsageError
from core.fileio import atomic_write, json_diff, jsonable, sha256_file, write_json
from core.options import format_key_values, parse_key_values
from core.split import StagedSplit, check_same_store, require_arrays
from heads import HEADS, create_head, get_spec, head_defaults, list_heads, supports
from heads.registry import head_class
from heads.stage_two.config import StageTwoTrainConfig
from heads.training.common import (BestState, check_identity, cosine_with_warmup, load_checkpoint, save,
                                   warmup_steps)
from heads.training.data import prefetched

DIMS = {1: (16,), 2: (16, 12)}


@pytest.mark.parametrize("name", list(HEADS))
def test_every_registered_head_builds_from_its_config_and_back(name: str) -> None:
    spec = get_spec(name)
    assert spec.stage in (1, 2) and spec.description
    torch.manual_seed(0)
    head = create_head(name, *DIMS[spec.stage])
    assert head.name == name and isinstance(head, head_class(name))
    cfg = head.config()
    json.dumps(cfg)
    assert cfg["name"] == name and set(spec.dims) <= set(cfg)
    again = create_head(**cfg)
    again.load_state_dict(head.state_dict())
    assert again.config() == cfg
    assert set(head_defaults(name)) == {f.name for f in dataclasses.fields(head.Config)}
    with pytest.raises(TypeError, match=rf"unknown option\(s\) \['nonsense'\] for .* head '{name}'"):
        create_head(name, *DIMS[spec.stage], nonsense=1)


def test_registry_listing_and_capabilities() -> None:
    assert list_heads(stage=2) == ["crosstvr", "t2v2t"]
    assert list_heads(supports="contrastive") == ["crosstvr"]
    assert supports(create_head("crosstvr", 16, 12), "token_selector") and not supports("t2v2t", "contrastive")
    assert supports("crosstvr", "blip2_init") and not supports("t2v2t", "blip2_init")
    assert not supports(object(), "text_tokens")
    with pytest.raises(UnknownHeadError, match="unknown stage-two head 'meanP'; known heads: crosstvr, t2v2t"):
        get_spec("meanP", stage=2)
    assert isinstance(UnknownHeadError("x"), (CrossTVRError, KeyError))


def test_heads_declare_what_never_decays() -> None:
    one = create_head("clip2video", 16, width=16, tab_dim=8, num_heads=4)
    decay, no_decay = one.optim_groups(0.05)
    names = {id(p): n for n, p in one.named_parameters()}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert {"logit_scale", "text_proj.weight", "text_proj.bias", "pos_emb", "type_emb", "centers"} <= kept
    assert all(names[id(p)] not in kept for p in decay["params"]) and decay["weight_decay"] == 0.05
    assert all(p.ndim >= 2 for p in decay["params"]) and no_decay["weight_decay"] == 0.0
    two = create_head("crosstvr", 16, 12, width=16, heads=2, itc_dim=8)  # the temporal pass shares the layers
    groups = two.optim_groups(0.1)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(two.parameters()))  # shared tensors once
    names = {id(p): n for n, p in two.named_parameters()}
    assert {"queries", "frame_pos"} <= {names[id(p)] for p in groups[1]["params"]}


def test_schedule_best_state_and_checkpoint_files(tmp_path: Path) -> None:
    assert warmup_steps(0.1, 200) == 20 and warmup_steps(7, 200) == 7
    assert cosine_with_warmup(0, 100, 10) == pytest.approx(0.1)
    assert cosine_with_warmup(10, 100, 10) == pytest.approx(1.0)
    assert cosine_with_warmup(55, 100, 10) == pytest.approx(0.5)
    assert cosine_with_warmup(100, 100, 10) == pytest.approx(0.0, abs=1e-12)
    model = torch.nn.Linear(2, 2)
    best = BestState()
    assert best.update(0.5, 0, model) and not best.update(0.5, 1, model) and best.epoch == 0
    with torch.no_grad():
        model.weight.add_(1.0)
    torch.testing.assert_close(best.state["weight"], model.weight.detach() - 1.0)  # a copy, not the live tensor
    path = save({"kind": "x", "a": 1}, tmp_path / "c.pt")
    assert not list(tmp_path.glob("*.part*"))
    assert load_checkpoint(tmp_path, "c.pt", "test", {"a"}, kind="x")[1]["a"] == 1
    with pytest.raises(CheckpointError, match="is not a test checkpoint"):
        load_checkpoint(path, "c.pt", "test", {"a", "b"})
    with pytest.raises(FileNotFoundError, match="no test checkpoint"):
        load_checkpoint(tmp_path / "nothing", "c.pt", "test", {"a"})
    check_identity({"name": "a"}, {"name": "a"}, "head")
    with pytest.raises(StoreMismatchError, match="head was trained on features of a different encoder.*name"):
        check_identity({"name": "a"}, {"name": "b"}, "head")


def test_one_prefetcher_for_every_loader() -> None:
    assert list(prefetched(range(5), lambda i: i * i, 2)) == [0, 1, 4, 9, 16]
    assert list(prefetched(range(5), lambda i: i * i, 0)) == [0, 1, 4, 9, 16]

    def boom(i: int) -> int:
        if i == 3:
            raise RuntimeError("bad row 3")
        return i

    with pytest.raises(RuntimeError, match="bad row 3"):
        list(prefetched(range(5), boom, 2))


def test_leaf_helpers(tmp_path: Path) -> None:
    assert jsonable({"a": (1, np.int64(2)), 3: np.float32(0.5), "n": float("nan")})["a"] == [1, 2]
    assert jsonable({"n": float("nan")}, strict=True) == {"n": None}
    assert json_diff({"a": 1, "b": 2}, {"a": 1, "b": 3}) == ["b: expected 2, found 3"]
    target = atomic_write(tmp_path / "x.npy", lambda tmp: np.save(tmp, np.arange(3)))
    assert np.load(target).tolist() == [0, 1, 2] and not list(tmp_path.glob("*.part*"))
    write_json(tmp_path / "j.json", {"k": (1, 2)})
    assert json.loads((tmp_path / "j.json").read_text()) == {"k": [1, 2]}
    assert len(sha256_file(target)) == 64
    options = {"width": 64, "mode": "spatial", "shared": False, "name": "1", "frames": None}
    assert parse_key_values(format_key_values(options)) == options
    assert parse_key_values(["num-selected=2"]) == {"num_selected": 2}
    with pytest.raises(UsageError, match="expected key=value, got 'width'"):
        parse_key_values(["width"])


def test_split_protocol_helpers() -> None:
    a = StagedSplit(split="train", video_ids=["v"], caption_ids=["c"], caption_video=np.zeros(1, np.int64),
                    frame_emb=np.zeros((1, 2, 3)), frame_mask=np.ones((1, 2), bool), text_emb=np.zeros((1, 3)),
                    store_fingerprint="s1")
    with pytest.raises(ValueError, match="has no tokens, text_tokens staged, which a head needs"):
        require_arrays(a, ("tokens", "text_tokens"), "a head")
    with pytest.raises(StoreMismatchError, match="different stores"):
        check_same_store(a, dataclasses.replace(a, split="val", store_fingerprint="s2"))


def test_trainer_configs_are_data() -> None:
    cfg = StageTwoTrainConfig(head="t2v2t").resolved()
    assert cfg.itc_steps == 0 and cfg.itc_weight == 0.0 and cfg.build_options() == {}
    cfg = StageTwoTrainConfig().resolved()
    assert cfg.itc_steps > 0 and cfg.build_options()["itc_dim"] > 0
    for f in dataclasses.fields(StageTwoTrainConfig):
        assert f.metadata.get("help"), f.name  # every option documents itself (the CLI's help)
    with pytest.raises(ValueError, match="hard_negatives must be one of"):
        StageTwoTrainConfig(hard_negatives="sometimes").resolved()
    assert math.isclose(StageTwoTrainConfig().lr, 5e-4)


@pytest.mark.parametrize("command", [["train-stage-one", "--head", "meanP"],
                                     ["train-head", "--stage-one", "."]])
def test_an_unknown_head_option_is_one_line_before_any_work(command: list[str], tmp_path) -> None:
    """A ``--head-option`` key the head does not have: exit 2, one line naming the key and the head's
    options, before the store is even opened (it does not exist here)."""
    from click.testing import CliRunner

    import cli

    result = CliRunner().invoke(cli.main, [*command, "--store", str(tmp_path / "none.zarr"), "--work-dir",
                                           str(tmp_path), "--head-option", "nonsense=1"])
    assert result.exit_code == 2, result.output
    assert "unknown --head-option(s) ['nonsense']" in result.output and "its options:" in result.output
    assert "Traceback" not in result.output

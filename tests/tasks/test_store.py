"""Checkpoint store: what a stage relies on when it hands a model to the next one."""

from __future__ import annotations

import hashlib
import json
import math
import os
import uuid
from pathlib import Path

import pytest
import torch

from tasks.runtime.loop import optimizer_state, optimizer_state_dict
from tasks.storage.checkpoints import (CheckpointRef, latest_checkpoint, list_checkpoints, load_checkpoint,
                                       read_manifest, save_checkpoint, verify_checkpoint)
from tasks.storage.store import CheckpointError, join_uri, store_root

pytest_plugins = ["tests.servers"]

MODEL_CONFIG = {"dim": 8, "depth": 1, "heads": 2, "vocab": 16}


def _weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(16, 8, generator=g)
    return {
        "token_emb.weight": emb,
        "to_logits.weight": emb,  # tied, as in PaLM: shares storage
        "proj.weight": torch.randn(8, 4, generator=g).t(),  # non-contiguous view
        "norm.gamma": torch.ones(8, dtype=torch.bfloat16),
    }


def _save(prefix, step: int = 1, seed: int = 0, **kwargs) -> CheckpointRef:
    kwargs.setdefault("kind", "pretrain")
    kwargs.setdefault("model_config", MODEL_CONFIG)
    return save_checkpoint(str(prefix), step, _weights(seed), **kwargs)


def assert_identical(a, b, where="state"):
    """Same structure, same Python types, bit-identical floats and tensors."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, float):
        assert a.hex() == b.hex() or (math.isnan(a) and math.isnan(b)), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            assert type(k) is type(next(kb for kb in b if kb == k)), f"{where}: key {k!r}"
            assert_identical(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_weights_and_flat_state_round_trip(tmp_path):
    big = torch.arange(12.0).reshape(3, 4)
    state = {
        "step": 40,
        "kl": {"value": 0.1, "adaptive": True, "target": 6.0, "horizon": 10000},
        "floats": [1e-8, -0.0, 2.0**-1074, 1 / 3, 1e308],
        "huge": 2**80,
        "flags": [True, False, None, "text"],
        "rng.torch": torch.get_rng_state(),
        "whole": big,
        "column": big[:, 1],  # a view: stored as its own tensor
        "same": big,  # shares storage with "whole"
        "half": torch.ones(3, dtype=torch.bfloat16),
        "empty": torch.zeros(0, 3, dtype=torch.int64),
    }
    ref = _save(tmp_path, 40, state=state)

    ckpt = load_checkpoint(ref.uri)

    assert ckpt.ref == ref and ref.step == 40 and ref.uri.endswith("/step-00000040")
    for name, tensor in _weights().items():
        assert torch.equal(ckpt.weights[name], tensor) and ckpt.weights[name].dtype == tensor.dtype
    assert set(ckpt.state) == set(state)
    for name, value in state.items():
        assert_identical(value, ckpt.state[name], name)


def test_trainer_state_that_is_not_plain_json_is_refused_naming_the_fix(tmp_path):
    for bad in ({"optimizer": {"state": {0: {"exp_avg": torch.ones(2)}}}}, {"loss": float("nan")}, {"ids": {1, 2}}):
        with pytest.raises(CheckpointError, match="plain values are not JSON .*flatten nested state"):
            _save(tmp_path / "store", 1, state=bad)
    assert not (tmp_path / "store").exists()


def test_adamw_resumed_from_checkpoint_matches_uninterrupted_run(tmp_path):
    def make():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 1))
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)

    def train_step(model, opt, i):
        x = torch.randn(16, 4, generator=torch.Generator().manual_seed(i))
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()

    model, opt = make()
    for i in range(3):
        train_step(model, opt, i)
    ref = save_checkpoint(
        str(tmp_path), 3, model.state_dict(), kind="pretrain", model_config={},
        state={**optimizer_state(opt), "step": 3},
    )
    train_step(model, opt, 3)  # the uninterrupted run goes on

    ckpt = load_checkpoint(ref.uri)
    resumed, resumed_opt = make()
    resumed.load_state_dict(ckpt.weights)
    resumed_opt.load_state_dict(optimizer_state_dict(ckpt.state))
    train_step(resumed, resumed_opt, 3)

    assert ckpt.state["step"] == 3 and list(optimizer_state_dict(ckpt.state)["state"]) == [0, 1, 2, 3]
    for a, b in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


def test_manifest_records_configs_lineage_and_every_file(tmp_path):
    parent = _save(tmp_path / "pretrain", 5)
    ref = _save(
        tmp_path / "reward", 7, kind="reward", stage_config={"lr": 3e-4, "betas": (0.9, 0.99)},
        parents=[parent, {"uri": "models:/palm@prod", "digest": "sha256:" + "0" * 64}],
        data={"feedback": "sha256:" + "1" * 64}, extra={"mlflow_run_id": "abc"},
    )

    manifest = read_manifest(ref.uri)

    assert manifest["kind"] == "reward" and manifest["step"] == 7 and manifest["format_version"] == 1
    assert manifest["model_config"] == MODEL_CONFIG
    assert manifest["stage_config"] == {"lr": 3e-4, "betas": [0.9, 0.99]}  # JSON: tuples become lists
    assert manifest["parents"][0] == {"uri": parent.uri, "digest": parent.digest}
    assert manifest["data"] == {"feedback": "sha256:" + "1" * 64} and manifest["mlflow_run_id"] == "abc"
    assert set(manifest["files"]) == {"weights.safetensors", "state.safetensors", "state.json"}
    folder = Path(ref.uri.removeprefix("file://"))
    for name, entry in manifest["files"].items():
        assert entry["bytes"] == (folder / name).stat().st_size
    assert ref.digest == manifest["digest"] == "sha256:" + manifest["files"]["weights.safetensors"]["sha256"]
    assert verify_checkpoint(ref.uri) == ref


def test_same_weights_give_same_digest_and_resaving_is_idempotent(tmp_path):
    first = _save(tmp_path / "a", 1)
    assert _save(tmp_path / "b", 1).digest == first.digest
    assert _save(tmp_path / "a", 1) == first  # a retried task finds its own checkpoint
    assert _save(tmp_path / "c", 1, seed=1).digest != first.digest


def test_different_content_at_an_existing_step_needs_overwrite(tmp_path):
    _save(tmp_path, 1)
    with pytest.raises(CheckpointError, match="already exists with different content"):
        _save(tmp_path, 1, seed=1)
    replaced = _save(tmp_path, 1, seed=1, overwrite=True)
    assert torch.equal(load_checkpoint(replaced.uri).weights["norm.gamma"], _weights(1)["norm.gamma"])


def test_a_garbled_manifest_is_replaced_on_save(tmp_path):
    ref = _save(tmp_path, 1)
    (Path(ref.uri.removeprefix("file://")) / "manifest.json").write_text("{")  # crash mid-write elsewhere
    assert latest_checkpoint(str(tmp_path)) is None
    assert _save(tmp_path, 1, seed=1) == latest_checkpoint(str(tmp_path))


def _tear(ref: CheckpointRef) -> Path:
    folder = Path(ref.uri.removeprefix("file://"))
    (folder / "manifest.json").unlink()
    return folder


def test_a_folder_without_manifest_is_no_checkpoint(tmp_path):
    complete = _save(tmp_path, 10)
    torn = _save(tmp_path, 20)
    _tear(torn)  # weights written, crash before the manifest

    assert latest_checkpoint(str(tmp_path)) == complete
    assert list_checkpoints(str(tmp_path)) == [complete]
    with pytest.raises(CheckpointError, match=r"no checkpoint at this URI \(manifest.json missing\)"):
        load_checkpoint(torn.uri)


def test_latest_checkpoint_is_the_highest_complete_step(tmp_path):
    refs = [_save(tmp_path, step) for step in (3, 100, 20)]
    Path(_save(tmp_path, 200).uri.removeprefix("file://"), "manifest.json").write_text('{"kind": ')
    (tmp_path / "notes").mkdir()

    assert latest_checkpoint(str(tmp_path)) == refs[1]
    assert latest_checkpoint("file://" + str(tmp_path)) == refs[1]
    assert [r.step for r in list_checkpoints(str(tmp_path))] == [3, 20, 100]
    assert latest_checkpoint(str(tmp_path / "nothing-here")) is None


def _truncate(folder: Path):
    path = folder / "weights.safetensors"
    path.write_bytes(path.read_bytes()[:-10])


def _flip_byte(folder: Path):
    path = folder / "weights.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def _drop_weights_from_manifest(folder: Path):
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["files"]["weights.safetensors"]
    (folder / "manifest.json").write_text(json.dumps(manifest))


CORRUPTIONS = {
    "truncated": (_truncate, r"weights.safetensors size mismatch \(manifest says \d+ bytes, file has \d+\)"),
    "flipped byte": (_flip_byte, r"weights.safetensors sha256 mismatch \(manifest says [0-9a-f]{12}…, file has"),
    "missing file": (lambda f: (f / "state.json").unlink(), r"state.json is missing \(listed in manifest.json\)"),
    "no weights": (_drop_weights_from_manifest, r"manifest.json lists no weights.safetensors"),
    "not JSON": (lambda f: (f / "manifest.json").write_bytes(b"\x00garbage"), r"manifest.json is not valid JSON"),
}


@pytest.mark.parametrize("case", CORRUPTIONS)
@pytest.mark.parametrize("reader", [load_checkpoint, verify_checkpoint])
def test_corruption_is_refused_naming_the_file_and_the_check(tmp_path, case, reader):
    ref = _save(tmp_path, 40, state={"step": 40})
    damage, message = CORRUPTIONS[case]
    damage(Path(ref.uri.removeprefix("file://")))

    with pytest.raises(CheckpointError, match=message) as err:
        reader(ref.uri)
    assert str(err.value).startswith(f"checkpoint {ref.uri}: ")


class _Payload:
    """Unpickling this would create the marker file: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("reader", [load_checkpoint, verify_checkpoint])
def test_a_pickle_in_place_of_weights_is_refused_without_running_it(tmp_path, reader):
    ref = _save(tmp_path, 1)
    folder, marker = Path(ref.uri.removeprefix("file://")), tmp_path / "code-ran"
    torch.save({"weights": _Payload(marker)}, folder / "weights.safetensors")
    # an attacker who can write the folder can also fix up the manifest's sha256s
    body = (folder / "weights.safetensors").read_bytes()
    manifest = json.loads((folder / "manifest.json").read_text())
    sha = hashlib.sha256(body).hexdigest()
    manifest["files"]["weights.safetensors"] = {"sha256": sha, "bytes": len(body)}
    manifest["digest"] = "sha256:" + sha
    (folder / "manifest.json").write_text(json.dumps(manifest))

    with pytest.raises(CheckpointError, match="weights.safetensors is not a safetensors file"):
        reader(ref.uri)
    assert not marker.exists()


def test_load_without_state_reads_weights_only(tmp_path):
    ref = _save(tmp_path, 1, state={"big": torch.zeros(4)})
    (Path(ref.uri.removeprefix("file://")) / "state.safetensors").unlink()

    ckpt = load_checkpoint(ref.uri, load_state=False)

    assert ckpt.state == {} and set(ckpt.weights) == set(_weights())


def test_bad_input_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value")
    cases = {
        "unknown storage protocol 'nope'": dict(prefix="nope://bucket/x"),
        "credentials inside the URI are not supported": dict(prefix="s3://AKIAKEY:s3cr3t-value@bucket/x"),
        "extra keys \\['step'\\] would overwrite": dict(extra={"step": 3}),
        "manifest field 'model_config' is not plain JSON": dict(model_config={"act": torch.nn.GELU}),
        "step must be a non-negative int": dict(step=-1),
    }
    for message, case in cases.items():
        args = {"prefix": str(tmp_path / "store"), "step": 1, "model_config": MODEL_CONFIG, **case}
        with pytest.raises(CheckpointError, match=message) as err:
            save_checkpoint(args.pop("prefix"), args.pop("step"), _weights(), kind="pretrain", **args)
        assert "s3cr3t" not in str(err.value) and "AKIAKEY" not in str(err.value)
    assert not (tmp_path / "store").exists()


def test_storage_errors_name_the_uri_and_the_cause(tmp_path):
    (tmp_path / "blocker").write_text("a file where the store's folder should be")
    with pytest.raises(CheckpointError, match=r"cannot [a-z .]+ \(NotADirectoryError: ") as err:
        _save(tmp_path / "blocker" / "pretrain", 1)
    assert str(err.value).startswith(f"checkpoint file://{tmp_path}/blocker/pretrain/step-00000001: ")


def test_store_root_and_join_uri(tmp_path, monkeypatch):
    monkeypatch.delenv("PALM_RLHF_STORE", raising=False)
    monkeypatch.setenv("PALM_RLHF_HOME", str(tmp_path))
    assert store_root() == os.path.join(str(tmp_path), "store")
    monkeypatch.delenv("PALM_RLHF_HOME")
    assert store_root() == os.path.abspath(".palm-rlhf/store")
    monkeypatch.setenv("PALM_RLHF_STORE", "s3://bucket/palm")
    assert store_root() == "s3://bucket/palm"

    assert join_uri("s3://bucket/palm/", "/pretrain/", "run-1") == "s3://bucket/palm/pretrain/run-1"
    assert join_uri("file:///", "tmp", "x") == "file:///tmp/x"
    assert join_uri("/data", "a") == "/data/a"


@pytest.fixture
def s3_store(s3_server, monkeypatch):
    """A fresh prefix in the moto bucket, reached through the standard AWS_* variables only."""
    import s3fs

    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    s3fs.S3FileSystem.clear_instance_cache()  # an instance built earlier keeps its old endpoint
    yield s3_server.url(f"store-{uuid.uuid4().hex}")
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.mark.servers
def test_s3_store_round_trips_and_skips_torn_folders(s3_store):
    import s3fs

    state = {"optimizer.0.exp_avg": torch.ones(3), "optimizer.param_groups": [{"betas": [0.9, 0.95]}], "kl_coef": 0.1}
    ref, torn = _save(s3_store, 1, state=state), _save(s3_store, 2)
    s3fs.S3FileSystem().rm_file(torn.uri.removeprefix("s3://") + "/manifest.json")

    assert ref.uri == f"{s3_store}/step-00000001" and latest_checkpoint(s3_store) == ref
    loaded = load_checkpoint(ref.uri).state
    assert set(loaded) == set(state) and all(assert_identical(v, loaded[k], k) is None for k, v in state.items())
    with pytest.raises(CheckpointError, match="no checkpoint at this URI"):
        load_checkpoint(torn.uri)
    with pytest.raises(CheckpointError, match=r"cannot write weights.safetensors \(FileNotFoundError: .*bucket"):
        _save(f"s3://missing-{uuid.uuid4().hex[:8]}/x", 1)

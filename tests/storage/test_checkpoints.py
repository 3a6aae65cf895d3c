import json
import pickle

import pytest
import torch
from soraflow.storage.checkpoints import (
    COMPLETE_MARKER,
    CheckpointError,
    load_training_state,
    load_weights_into,
    read_model_config,
    read_state_dict,
    refuse_pickles,
    save_model_dir,
    save_training_state,
    verify_training_state,
)


class Toy(torch.nn.Module):
    """Two layers plus the two recomputed positional buffers STDiT carries."""

    def __init__(self, width=4):
        super().__init__()
        self.register_buffer("pos_embed", torch.arange(3.0))
        self.register_buffer("pos_embed_temporal", torch.arange(2.0))
        self.a = torch.nn.Linear(3, width)
        self.b = torch.nn.Linear(width, 2)


def _same(m1, m2):
    return all(torch.equal(x, y) for x, y in zip(m1.state_dict().values(), m2.state_dict().values()))


def test_model_dir_roundtrip(tmp_path):
    torch.manual_seed(0)
    src, dst = Toy(), Toy()
    folder = save_model_dir(tmp_path / "m", src, {"preset": "toy", "kwargs": {"width": 4}})
    assert read_model_config(folder)["kwargs"] == {"width": 4}
    sd = read_state_dict(folder)
    assert "pos_embed" not in sd and set(sd) == {"a.weight", "a.bias", "b.weight", "b.bias"}
    load_weights_into(dst, sd)
    assert _same(src, dst)
    refuse_pickles(folder)  # safetensors + json only


@pytest.mark.parametrize("wrapper", [None, "ema", "state_dict"])
def test_opensora_pth_flat_or_wrapped(tmp_path, wrapper):
    torch.manual_seed(1)
    src, dst = Toy(), Toy()
    sd = src.state_dict()  # includes the positional buffers, as Open-Sora's ema.pt does
    path = tmp_path / "ckpt.pth"
    torch.save(sd if wrapper is None else {wrapper: sd, "step": 3}, path)
    load_weights_into(dst, read_state_dict(path), str(path))
    assert _same(src, dst)


def test_pth_with_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"

    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    with open(path, "wb") as f:
        pickle.dump({"a.weight": Payload()}, f)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        read_state_dict(path)


def test_mismatch_lists_missing_unexpected_and_shapes(tmp_path):
    sd = Toy(width=4).state_dict()
    sd.pop("b.bias")
    sd["extra.weight"] = torch.zeros(1)
    sd["a.weight"] = torch.zeros(5, 3)
    with pytest.raises(CheckpointError) as e:
        load_weights_into(Toy(width=4), sd, "my.ckpt")
    msg = str(e.value)
    assert "my.ckpt" in msg and "missing keys: b.bias" in msg and "unexpected keys: extra.weight" in msg
    assert "a.weight: checkpoint (5, 3) vs model (4, 3)" in msg


@pytest.mark.parametrize("content", [b"", b"garbage" * 10])
def test_damaged_files_are_clear_errors(tmp_path, content):
    for name in ("x.safetensors", "x.pth"):
        p = tmp_path / name
        p.write_bytes(content)
        with pytest.raises(CheckpointError, match=name):
            read_state_dict(p)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        read_state_dict(tmp_path / "none.safetensors")
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        read_state_dict(tmp_path / "x.ckpt")


def test_pickles_in_model_folder_refused(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="weights.bin"):
        refuse_pickles(tmp_path)


def test_training_state_roundtrip_restores_optimizer(tmp_path):
    torch.manual_seed(2)
    model = Toy()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        model.b(model.a(torch.randn(5, 3))).pow(2).mean().backward()
        opt.step()
    save_training_state(
        tmp_path / "ck",
        model.state_dict(),
        model.state_dict(),
        opt.state_dict(),
        {"step": 3, "loss_history": [1.0, 0.5]},
    )
    assert not list((tmp_path / "ck").glob("*.pt"))
    state = load_training_state(tmp_path / "ck")
    assert state["meta"] == {"step": 3, "loss_history": [1.0, 0.5]}
    model2 = Toy()
    model2.load_state_dict(state["model"])
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    opt2.load_state_dict(state["optimizer"])
    # one more identical step on both gives identical weights: the optimizer state came back exactly
    x = torch.randn(5, 3)
    for m, o in ((model, opt), (model2, opt2)):
        o.zero_grad()
        m.b(m.a(x)).pow(2).mean().backward()
        o.step()
    assert _same(model, model2)
    json.loads((tmp_path / "ck" / "state.json").read_text())  # plain JSON


def test_pickle_refusal_ignores_case(tmp_path):
    (tmp_path / "WEIGHTS.PT").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="WEIGHTS.PT"):
        refuse_pickles(tmp_path)


def _state(folder, step):
    model = Toy()
    return save_training_state(folder, model.state_dict(), model.state_dict(), None, {"step": step})


def test_training_state_needs_its_completion_marker_and_matching_hashes(tmp_path):
    folder = _state(tmp_path / "ck", 1)
    assert json.loads((folder / COMPLETE_MARKER).read_text())["files"].keys() == {"state.safetensors", "state.json"}
    verify_training_state(folder)
    # truncated tensors: the hash no longer matches, whatever safetensors would make of it
    data = (folder / "state.safetensors").read_bytes()
    (folder / "state.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="state.safetensors.*does not match the sha256"):
        load_training_state(folder)
    # a save that stopped before the marker
    folder = _state(tmp_path / "ck2", 2)
    (folder / COMPLETE_MARKER).unlink()
    with pytest.raises(CheckpointError, match="no complete.json"):
        load_training_state(folder)
    # an edited state.json
    folder = _state(tmp_path / "ck3", 3)
    (folder / "state.json").write_text((folder / "state.json").read_text().replace('"step": 3', '"step": 4'))
    with pytest.raises(CheckpointError, match="state.json"):
        load_training_state(folder)

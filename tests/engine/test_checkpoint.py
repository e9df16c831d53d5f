import pytest
import torch

from cls2det.engine.checkpoint import CheckpointError, load_model_state, load_state, save_checkpoint


def test_round_trip_and_atomic_replace(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    path = save_checkpoint(tmp_path / "last", model.state_dict(), {"optimizer": optimizer.state_dict(), "step": 7})
    weights = load_model_state(path)
    assert torch.equal(weights["weight"], model.weight.detach())
    state = load_state(path)
    assert state["step"] == 7
    assert torch.equal(
        state["optimizer"]["state"][0]["momentum_buffer"], optimizer.state[model.weight]["momentum_buffer"]
    )
    save_checkpoint(tmp_path / "last", {"weight": torch.zeros(2, 3)}, {"step": 8})
    assert load_state(path)["step"] == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]  # no temp or old folder left behind


def test_shared_tensors_are_saved(tmp_path):
    shared = torch.ones(4)
    save_checkpoint(tmp_path / "c", {"a": shared, "b": shared}, {})
    weights = load_model_state(tmp_path / "c")
    assert torch.equal(weights["a"], weights["b"])


def test_truncated_weights_give_clear_error(tmp_path):
    path = save_checkpoint(tmp_path / "c", {"w": torch.ones(100)}, {"step": 1})
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: not a valid safetensors file"):
        load_model_state(path)


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickled_code_is_refused(tmp_path, capsys):
    path = save_checkpoint(tmp_path / "c", {"w": torch.ones(1)}, {"step": 1})
    torch.save({"step": _Evil()}, path / "state.pt")
    with pytest.raises(CheckpointError, match="unreadable or unsafe checkpoint state"):
        load_state(path)
    assert "pwned" not in capsys.readouterr().out


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_model_state(tmp_path / "nope")

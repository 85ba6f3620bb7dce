"""The YAML recipe reader: keys map one to one onto config dataclasses, with clear errors."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from sparseforge.errors import SparseforgeError
from sparseforge.recipes import from_mapping, read_yaml, to_mapping


@dataclass
class Optim:
    lr: float = 0.1
    betas: tuple[float, ...] = (0.9, 0.999)


@dataclass
class Run:
    model: str
    epochs: int = 1
    limit: int | None = None
    optim: Optim = field(default_factory=Optim)

    def validate(self) -> None:
        if self.epochs < 1:
            raise SparseforgeError(f"epochs must be >= 1, got {self.epochs}")


def test_nested_mapping_round_trips():
    run = from_mapping(Run, {"model": "conv4", "epochs": 3, "optim": {"lr": 1, "betas": [0.5, 0.6]}})
    assert run == Run("conv4", 3, None, Optim(1.0, (0.5, 0.6)))
    assert isinstance(run.optim.lr, float)
    assert from_mapping(Run, to_mapping(run)) == run


@pytest.mark.parametrize("data, message", [
    ({"model": "m", "optim": {"lrr": 1}}, "unknown key 'optim.lrr' (did you mean 'lr'?)"),
    ({"model": "m", "epochs": "3"}, "epochs must be an integer, got str '3'"),
    ({"model": "m", "epochs": True}, "epochs must be an integer"),
    ({"model": "m", "limit": 2.5}, "limit must be int or null"),
    ({"model": "m", "optim": [1]}, "optim must be a mapping"),
    ({"model": "m", "optim": {"betas": 0.9}}, "optim.betas must be a list"),
    ({}, "missing required key 'model'"),
    ({"model": "m", "epochs": 0}, "epochs must be >= 1"),
])
def test_bad_values_name_the_key(data, message):
    with pytest.raises(SparseforgeError, match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")
                       .replace(".", r"\.").replace("[", r"\[")):
        from_mapping(Run, data)


def test_read_yaml_errors(tmp_path):
    with pytest.raises(SparseforgeError, match="does not exist"):
        read_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: conv4\nepochs: [1,\n")
    with pytest.raises(SparseforgeError, match=r"not valid YAML at line \d+"):
        read_yaml(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(SparseforgeError, match="must be a YAML mapping"):
        read_yaml(lst)
    good = tmp_path / "good.yaml"
    good.write_text("model: conv4\noptim:\n  lr: 0.05\n")
    assert from_mapping(Run, read_yaml(good)).optim.lr == 0.05

"""Bad settings are refused before anything runs, naming the key."""

from pathlib import Path

import pytest

from udaflow.config import Config, ConfigError
from udaflow.data.manifest import DataError
from udaflow.preflight import check_run_config


def _cfg(tmp_path: Path, **update) -> Config:
    for name in ("synth", "mnist"):
        (tmp_path / name).mkdir(exist_ok=True)
    cfg = Config()
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"root": tmp_path})})
    for key, value in update.items():
        section, _, field = key.partition(".")
        if field:
            cfg = cfg.model_copy(update={section: getattr(cfg, section).model_copy(update={field: value})})
        else:
            cfg = cfg.model_copy(update={section: value})
    return cfg


def test_a_good_config_passes(tmp_path):
    check_run_config(_cfg(tmp_path))


@pytest.mark.parametrize("update, match", [
    ({"method": "nosuch"}, r"^method: unknown method 'nosuch'"),
    ({"methods": {"dann": {"trade_off": "big"}}}, r"^methods\.dann\.trade_off: expected float"),
    ({"methods": {"adamatch": {"tua": 0.9}}}, r"^methods\.adamatch\.tua: unknown key"),
    ({"methods": {"nosuch": {}}}, r"^methods\.nosuch: unknown method"),
    ({"validator": "accuracy"}, r"^validator: unknown validator 'accuracy'"),
    ({"promotion.validator": "best"}, r"^promotion\.validator: unknown validator 'best'"),
    ({"model.backbone": "nosuch_model"}, r"^model\.backbone: unknown backbone 'nosuch_model'"),
    ({"model.backbone_args": {"stem_width": 16, "nosuch": 1}}, r"^model\.backbone_args: "),
    ({"model.backbone_args": {"input_norm": "sepia"}}, r"^model: model\.backbone_args\.input_norm: 'sepia'"),
])
def test_bad_settings_name_their_key(tmp_path, update, match):
    with pytest.raises(ConfigError, match=match):
        check_run_config(_cfg(tmp_path, **update))


def test_a_missing_domain_names_the_folder(tmp_path):
    with pytest.raises(DataError, match=r"target: domain 'nosuch' not found"):
        check_run_config(_cfg(tmp_path, target="nosuch"))

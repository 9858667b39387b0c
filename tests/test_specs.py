"""The data contract: validation errors name the field and the sample key; JSON Schemas export."""

from __future__ import annotations

import json

import pytest

from data_specs import SCHEMAS, CaptionRecord, ErrorRow, SpecError, ToyClip, validate
from data_specs.__main__ import main as specs_main


def test_validation_error_names_every_bad_field_and_the_key():
    bad = {"text": "a red circle", "kind": "dream", "provenance": {"model_id": 3}}
    with pytest.raises(SpecError) as err:
        validate(CaptionRecord, bad, key="pool-000012", url="pool-00000.tar")
    msg = str(err.value)
    assert "pool-000012" in msg and "pool-00000.tar" in msg
    fields = {f for f, _ in err.value.problems}
    assert {"kind", "provenance.model_id", "provenance.engine_version"} <= fields


def test_unknown_fields_are_errors_not_silently_dropped():
    with pytest.raises(SpecError, match="stagee"):
        validate(ErrorRow, {"key": "k", "stage": "read", "reason": "x", "stagee": "typo"})


def test_json_text_is_validated_too():
    with pytest.raises(SpecError, match="key 'k1'"):
        validate(ToyClip, b'{"split": "test"}', key="k1")


def test_schema_cli_exports_every_schema(tmp_path, capsys):
    assert specs_main(["schema", "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == sorted(f"{n}.schema.json" for n in SCHEMAS)
    caption = json.loads((tmp_path / "caption_record.schema.json").read_text())
    assert caption["properties"]["kind"]["enum"] == ["pseudo", "frame", "alt", "gt"]
    assert specs_main(["schema", "error_row"]) == 0
    assert json.loads(capsys.readouterr().out)["title"] == "ErrorRow"
    with pytest.raises(SystemExit):
        specs_main(["schema", "no_such_schema"])

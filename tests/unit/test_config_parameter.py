"""The settings are a Prefect parameter: the flow's is typed ``Config`` and tasks take it, so
Prefect's collection walker (task inputs, parameter serialisation) must get through every
section. A field named like a mapping method (``keys``, ``items``) once broke every task that
took the settings ('str' object is not callable)."""

from __future__ import annotations

from prefect.utilities.collections import visit_collection

from fedmtl.config import Config, load_config

MAPPING_METHODS = {"keys", "items", "values", "get"}


def test_prefect_walks_the_whole_config() -> None:
    cfg = load_config(
        None, ["federation.mode=sites", "federation.exchange=file:///x", "federation.sites=/y"]
    )
    seen = []
    visit_collection(cfg, visit_fn=lambda x: seen.append(x) or x, return_data=False)
    assert cfg in seen and cfg.federation in seen and cfg.privacy.dp_fedavg in seen


def test_no_section_has_a_field_named_like_a_mapping_method() -> None:
    def fields(model) -> set[str]:
        out = set(model.model_fields)
        for field in model.model_fields.values():
            annotation = field.annotation
            if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
                out |= fields(annotation)
        return out

    assert not fields(Config) & MAPPING_METHODS

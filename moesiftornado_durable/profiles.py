"""Normalise user and company updates into plain dicts, as moesiftornado accepts them.

The original takes a dict, a moesifapi model or a JSON string; so does this. Unlike the original, an
update without its id raises `ValueError` naming the field instead of printing and going nowhere.
"""

from __future__ import annotations

import json
from typing import Any, Dict, Iterable, List

from moesifapi.models import BaseModel

Profile = Dict[str, Any]


def normalize_profile(profile: Any, id_field: str) -> Profile:
    """One update as a dict with a non-empty `id_field`; raises ValueError otherwise."""
    if isinstance(profile, BaseModel):
        profile = {key: value for key, value in profile.to_dictionary().items() if value is not None}
    elif isinstance(profile, (str, bytes)):
        profile = _parse_json(profile)
    if not isinstance(profile, dict):
        raise ValueError(f"expected a dict, a moesifapi model or a JSON string, got {type(profile).__name__}")
    if profile.get(id_field) in (None, ""):
        raise ValueError(f"the field {id_field!r} is required")
    return dict(profile)


def normalize_profiles(profiles: Iterable[Any], id_field: str) -> List[Profile]:
    """Every update of a batch, validated before any is accepted, so a bad one rejects the whole call."""
    if isinstance(profiles, (str, bytes)):
        profiles = _parse_json(profiles)
    if isinstance(profiles, dict) or not isinstance(profiles, Iterable):
        raise ValueError(f"expected a list of updates, got {type(profiles).__name__}")
    return [normalize_profile(profile, id_field) for profile in profiles]


def _parse_json(text: Any) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise ValueError(f"could not parse the JSON given: {exc}") from exc

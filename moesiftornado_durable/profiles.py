"""Normalise user, company and subscription updates into plain dicts, as the Moesif middlewares accept them.

The originals take a dict, a moesifapi model or a JSON string; so does this. Unlike the originals, an
update without a required field raises `ValueError` naming the field instead of logging and going
nowhere. Users need `user_id`, companies `company_id`, subscriptions `subscription_id`, `company_id`
and `status` (as moesifdjango requires; moesifwsgi 1.10.5 has no subscription call).
"""

from __future__ import annotations

import datetime
import json
from typing import Any, Dict, Iterable, List, Sequence, Union

from moesifapi.models import BaseModel

Profile = Dict[str, Any]

USER_FIELDS = ("user_id",)
COMPANY_FIELDS = ("company_id",)
SUBSCRIPTION_FIELDS = ("subscription_id", "company_id", "status")


def normalize_profile(profile: Any, required: Union[str, Sequence[str]]) -> Profile:
    """One update as a dict with every `required` field non-empty; raises ValueError otherwise."""
    if isinstance(profile, BaseModel):
        profile = {key: value for key, value in profile.to_dictionary().items() if value is not None}
    elif isinstance(profile, (str, bytes)):
        profile = _parse_json(profile)
    if not isinstance(profile, dict):
        raise ValueError(f"expected a dict, a moesifapi model or a JSON string, got {type(profile).__name__}")
    for field in (required,) if isinstance(required, str) else required:
        if profile.get(field) in (None, ""):
            raise ValueError(f"the field {field!r} is required")
    return {key: _jsonable(value) for key, value in profile.items()}


def normalize_profiles(profiles: Iterable[Any], required: Union[str, Sequence[str]]) -> List[Profile]:
    """Every update of a batch, validated before any is accepted, so a bad one rejects the whole call."""
    if isinstance(profiles, (str, bytes)):
        profiles = _parse_json(profiles)
    if isinstance(profiles, dict) or not isinstance(profiles, Iterable):
        raise ValueError(f"expected a list of updates, got {type(profiles).__name__}")
    return [normalize_profile(profile, required) for profile in profiles]


def _jsonable(value: Any) -> Any:
    """Dates as ISO 8601 text (as moesifapi's models write them), so a dict and a model spool alike."""
    if isinstance(value, (datetime.datetime, datetime.date)):
        return value.isoformat()
    return value


def _parse_json(text: Any) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise ValueError(f"could not parse the JSON given: {exc}") from exc

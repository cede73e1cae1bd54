"""Text cleaning, configured per model and stored with it.

Training and serving call the same :func:`clean_texts` with the configuration saved in the model's
metadata, so a served model sees its inputs exactly as it saw them in training.
"""

from __future__ import annotations

import html
import re
import unicodedata

from pydantic import BaseModel, ConfigDict

_SPECIAL = re.compile(r"[^\w\s'.,!?-]", re.UNICODE)
_SPACES = re.compile(r"\s+")


class CleaningConfig(BaseModel):
    """How raw text is normalised before tokenization."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    unescape_html: bool = True
    """Turn HTML entities such as ``&#039;`` into characters."""
    unicode_nfkc: bool = True
    """Apply Unicode NFKC normalisation (full-width forms, ligatures)."""
    lowercase: bool = True
    strip_special: bool = True
    """Replace characters other than letters, digits and basic punctuation with spaces."""
    collapse_whitespace: bool = True


def clean_text(text: str, cfg: CleaningConfig) -> str:
    """Normalise one text according to ``cfg``."""
    if cfg.unescape_html:
        # Twice: the drugsCom reviews carry double-escaped entities such as ``&amp;#039;``.
        text = html.unescape(html.unescape(text))
    if cfg.unicode_nfkc:
        text = unicodedata.normalize("NFKC", text)
    if cfg.lowercase:
        text = text.lower()
    if cfg.strip_special:
        text = _SPECIAL.sub(" ", text)
    if cfg.collapse_whitespace:
        text = _SPACES.sub(" ", text).strip()
    return text


def clean_texts(texts: list[str], cfg: CleaningConfig) -> list[str]:
    """Normalise a batch of texts."""
    return [clean_text(t, cfg) for t in texts]

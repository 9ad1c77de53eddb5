"""Workflows several commands share: profile a model into an output folder, merging with what is there."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Sequence

from ..agreement import refresh
from ..budget import check_fits
from ..executor import ExecutorConfig
from ..load import load
from ..profiles import Profile
from ..profiling import profile_model, resolve_seq_len
from ..texts import BBC_CALIBRATION, bbc_news, select_texts


def existing_profile(out: Path, model, overwrite: bool = False) -> Profile | None:
    """The profile already in `out` (new results are merged into it), or None; one of another model is refused
    unless `overwrite` is set."""
    existing = out / "profile.json"
    if not existing.exists() or overwrite:
        return None
    return Profile.load(existing, model=model, fix="choose another --out or pass --overwrite")


def merged(previous, profile):
    """`profile`'s results merged into the profile already in the output directory (if any), with the
    agreement between all its rankings refreshed."""
    if previous is not None:
        previous.merge(profile)
        profile = previous
    refresh(profile)
    return profile


def run_profile(source: str, out: Path, texts: list[str] | None, *, seq_len: int | None = None,
                max_tokens: int | None = None, batch_size: int = 8, analyses: Sequence[str] = ("redundancy",),
                overwrite: bool = False, data: dict | None = None, progress: bool = True,
                analysis_params: dict | None = None, executor: ExecutorConfig | None = None,
                dtype: str | None = None, layer_by_layer: bool = False, memory_cap: int | None = None):
    model = load(source, dtype=dtype, layer_by_layer=layer_by_layer)
    seq = resolve_seq_len(model, seq_len)
    check_fits(model, batch_size, seq, memory_cap)  # before any weight of a layer-by-layer model is read
    previous = existing_profile(out, model, overwrite)
    if texts is None:
        texts = bbc_news("calibration")
        data = {"source": BBC_CALIBRATION}
        if max_tokens is None:
            max_tokens = 2048
    texts = select_texts(model, texts, seq, max_tokens)
    resume = out / ".profile-partial.safetensors"  # the scans' running state: a killed run continues from it
    profile = profile_model(model, texts, analyses=analyses, analysis_params=analysis_params,
                            batch_size=batch_size, seq_len=seq, data=data, progress=progress, resume=resume,
                            executor=executor)
    profile = merged(previous, profile)
    path = profile.save(out)
    resume.unlink(missing_ok=True)
    shutil.rmtree(f"{resume}-items", ignore_errors=True)  # the executor's finished items
    if not profile.to_frame().empty:
        profile.to_table(out / "layers.csv")
    return profile, path

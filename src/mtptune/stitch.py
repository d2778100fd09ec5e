"""Step 5 of the workflow: write a servable copy of the verifier whose only changed tensors are the `mtp.*` head.

Contract (docs/contracts.md, "Stitching"): every head tensor goes back under the verifier's own name, layout (per-expert
or fused experts, as the verifier stores them), dtype and shard; shards without head tensors are hard-linked (or copied
with `copy_untouched=True`, and always copied when linking fails); config.json and the index are left as they are. After
writing, the output is verified tensor by tensor; any failure removes the partial output and raises.

Attach mode (automatic for a verifier without `mtp.*` tensors whose family `attaches_head`, e.g. Llama): the head
goes into a new shard `mtp.safetensors` in the Qwen-style `mtp.*` layout; every verifier file is hard-linked or
copied untouched; the index gains the head's keys (a single-file verifier gets a new index beside its
`model.safetensors`, which transformers keeps loading alone, so the trunk loads exactly as before); config.json
gains only the family's fields (`mtp_num_hidden_layers`, `mtptune_mtp_family`). Verification: the verifier's
tensors bit-identical and in their original files, the head's written exactly, config unchanged but for those
fields. Stitching again into the attached output is the ordinary replace mode.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from mtptune.checkpoint.files import atomic_folder, is_temporary, json_text
from mtptune.checkpoint.head_checkpoint import load_head_checkpoint
from mtptune.checkpoint.safetensors_io import (
    INDEX_NAME,
    SINGLE_NAME,
    SafetensorsCheckpoint,
    open_safetensors,
    read_config_dict,
)
from mtptune.checkpoint.verifier import Verifier
from mtptune.errors import CheckpointError
from mtptune.families import family_by_name

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StitchReport:
    output: Path
    replaced: int  # head tensors written
    rewritten_shards: list[str]
    linked_shards: list[str]
    copied_shards: list[str]
    changed: int  # head tensors whose values differ from the verifier's
    attached: bool = False  # the verifier had no head: the head was added (attach mode), not replaced


def stitch(
    checkpoint: str | os.PathLike,
    verifier: str | os.PathLike,
    output_path: str | os.PathLike | None = None,
    copy_untouched: bool = False,
    overwrite: bool = False,
) -> StitchReport:
    head_config, head_state = load_head_checkpoint(checkpoint)
    _check_finite(head_state, checkpoint)
    ver = Verifier.open(str(verifier))
    ver.check_fits(head_config, checkpoint)
    family = family_by_name(head_config.family)
    output = Path(output_path) if output_path else Path.cwd() / f"{ver.root.resolve().name}-stitched"
    if output.resolve() == ver.root.resolve():
        raise CheckpointError(f"--output-path {output} is the verifier itself; stitch writes a copy.")
    attach = not ver.trainable_head_keys() and family.attaches_head
    native = (
        _attached_head_tensors(family, head_state, ver)
        if attach
        else _native_head_tensors(family, head_state, ver, checkpoint)
    )
    if Path(head_config.verifier_name_or_path).name != ver.root.name and head_config.verifier_name_or_path != str(
        verifier
    ):
        logger.warning(
            "head %s was made for verifier %s; stitching it into %s, which it fits (same family, sizes and tensor "
            "shapes): make sure this is intended",
            checkpoint,
            head_config.verifier_name_or_path,
            verifier,
        )
    skip = _skip_output(output)
    with atomic_folder(output, overwrite=overwrite, what="stitched model") as tmp:
        if attach:
            report = _write_attached(ver, family, native, tmp, copy_untouched, skip)
            _verify_attached(ver, family, native, tmp)
        else:
            report = _write(ver.checkpoint, native, tmp, copy_untouched, skip)
            _verify(ver.checkpoint, native, tmp)
    report = StitchReport(output=output, **report)
    logger.info(
        "%s %d head tensors (%d changed) into %s; wrote %s, hard-linked %d, copied %d untouched shards",
        "attached" if report.attached else "stitched",
        report.replaced,
        report.changed,
        output,
        report.rewritten_shards,
        len(report.linked_shards),
        len(report.copied_shards),
    )
    return report


def _check_finite(head_state: dict[str, torch.Tensor], source) -> None:
    """A NaN/Inf weight would serve garbage drafts; refuse it by name (a diverged run's checkpoint)."""
    for key, value in head_state.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise CheckpointError(
                f"head {source}: tensor 'mtp.{key}' holds non-finite values (NaN or Inf), so it cannot be stitched; "
                "the training run probably diverged. Stitch an earlier checkpoint."
            )


def _skip_output(output: Path) -> Callable[[Path], bool]:
    """Which verifier entries not to copy: the output itself and its temporary siblings, when the output lies inside
    the verifier folder (copying them would nest every earlier stitch, and the one being written, into the next)."""
    target = output.resolve()

    def skip(entry: Path) -> bool:
        resolved = entry.resolve()
        return resolved == target or (resolved.parent == target.parent and is_temporary(entry.name, target.name))

    return skip


def _native_head_tensors(family, head_state, ver: Verifier, source) -> dict[str, torch.Tensor]:
    # Frozen MTP copies of verifier tensors (DeepSeek's shared_head.head / embed_tokens) are neither written nor
    # expected from the head; `_verify` then checks them bit-identical like every other non-head tensor.
    verifier_keys = set(ver.trainable_head_keys())
    if not verifier_keys:
        raise CheckpointError(f"verifier {ver.root} has no mtp.* tensors to replace; it is not an MTP verifier.")
    native = family.head_to_native(head_state, verifier_keys)
    missing, unexpected = sorted(verifier_keys - set(native)), sorted(set(native) - verifier_keys)
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"not in the verifier {unexpected[:3]}"
        raise CheckpointError(f"head {source} does not match verifier {ver.root}: {detail}.")
    out = {}
    for key, value in native.items():
        target_shape = ver.checkpoint.shape(key)
        if tuple(value.shape) != target_shape:
            raise CheckpointError(
                f"head {source}: {key} has shape {tuple(value.shape)} but verifier {ver.root} has {target_shape}; "
                "this head does not fit this verifier."
            )
        out[key] = value.to(ver.checkpoint.get(key).dtype).contiguous()
    return out


def _write(
    ckpt: SafetensorsCheckpoint,
    native: dict[str, torch.Tensor],
    tmp: Path,
    copy_untouched: bool,
    skip: Callable[[Path], bool],
) -> dict:
    shards_with_head = {ckpt.weight_map[k] for k in native}
    rewritten, linked, copied, changed = [], [], [], 0
    for entry in sorted(ckpt.root.iterdir()):
        target = tmp / entry.name
        if skip(entry):
            continue
        if entry.name in shards_with_head:
            shard, tensors = open_safetensors(entry), {}
            for key in shard.keys():  # every tensor the file holds, whether or not the index lists it
                if key in native:
                    changed += int(not _same_bits(shard.get_tensor(key), native[key]))
                    tensors[key] = native[key]
                else:
                    tensors[key] = shard.get_tensor(key)
            save_file(tensors, target, metadata=shard.metadata())
            rewritten.append(entry.name)
        else:
            _copy_untouched(entry, target, copy_untouched, linked, copied, skip)
    return {
        "replaced": len(native),
        "rewritten_shards": rewritten,
        "linked_shards": linked,
        "copied_shards": copied,
        "changed": changed,
    }


def _copy_untouched(
    entry: Path, target: Path, copy_untouched: bool, linked: list[str], copied: list[str], skip: Callable[[Path], bool]
) -> None:
    """Bring a verifier file the head does not touch into the output: shards hard-linked (copied when asked or
    when linking fails), folders and other files copied (except what `skip` names, at any depth)."""
    if entry.is_dir():
        shutil.copytree(
            entry, target, symlinks=True, ignore=lambda folder, names: [n for n in names if skip(Path(folder, n))]
        )
    elif entry.suffix == ".safetensors" and not copy_untouched and _try_link(entry, target):
        linked.append(entry.name)
    else:
        shutil.copy2(entry, target)
        if entry.suffix == ".safetensors":
            copied.append(entry.name)


def _try_link(src: Path, dst: Path) -> bool:
    try:
        os.link(src.resolve(), dst)
        return True
    except OSError:
        return False


def _verify(original: SafetensorsCheckpoint, native: dict[str, torch.Tensor], out_dir: Path) -> None:
    stitched = SafetensorsCheckpoint.open(out_dir)
    if stitched.weight_map != original.weight_map:
        raise CheckpointError("stitch verification failed: the tensor set or shard assignment changed.")
    for key, shard in original.weight_map.items():
        new = stitched.get(key)
        expected = native.get(key)
        if expected is None:
            expected = original.get(key)
        if not _same_bits(new, expected):
            what = "head tensor was not written" if key in native else "non-head tensor changed"
            raise CheckpointError(f"stitch verification failed: {key} in {shard}: {what}.")


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical: same dtype, shape and bytes (torch.equal calls two NaNs different and -0.0 equal to 0.0)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


ATTACHED_SHARD = "mtp.safetensors"


def _attached_head_tensors(family, head_state, ver: Verifier) -> dict[str, torch.Tensor]:
    """The head under its `mtp.*` names in the verifier's weight dtype (its embedding's)."""
    native = family.head_to_native(head_state, set())
    clash = sorted(set(native) & set(ver.checkpoint.weight_map))
    if clash:
        raise CheckpointError(f"verifier {ver.root} already holds {clash[0]!r}; cannot attach a head next to it.")
    dtype = ver.checkpoint.get(ver.shared_names().embed).dtype
    return {k: v.to(dtype).contiguous() for k, v in native.items()}


def _write_attached(
    ver: Verifier,
    family,
    native: dict[str, torch.Tensor],
    tmp: Path,
    copy_untouched: bool,
    skip: Callable[[Path], bool],
) -> dict:
    ckpt = ver.checkpoint
    if (ckpt.root / ATTACHED_SHARD).exists():
        raise CheckpointError(f"{ckpt.root / ATTACHED_SHARD} exists but holds no mtp.* tensor the index names.")
    linked, copied = [], []
    for entry in sorted(ckpt.root.iterdir()):
        target = tmp / entry.name
        if entry.name in ("config.json", INDEX_NAME) or skip(entry):
            continue
        _copy_untouched(entry, target, copy_untouched, linked, copied, skip)
    save_file(native, tmp / ATTACHED_SHARD, metadata={"format": "pt", "producer": "mtptune", "mtp_family": family.name})
    index = dict(ckpt.index) if ckpt.index is not None else {"metadata": {}}
    weight_map = {**ckpt.weight_map, **dict.fromkeys(native, ATTACHED_SHARD)}
    metadata = dict(index.get("metadata") or {})
    metadata["total_size"] = sum(
        (tmp / shard).stat().st_size for shard in sorted(set(weight_map.values()))
    )  # file sizes: an upper bound like transformers' own, never read for loading
    index.update(metadata=metadata, weight_map=dict(sorted(weight_map.items())))
    (tmp / INDEX_NAME).write_text(json_text(index))
    config = read_config_dict(ckpt.root)
    config.update(family.attach_config_fields())
    (tmp / "config.json").write_text(json_text(config))
    return {
        "replaced": len(native),
        "rewritten_shards": [ATTACHED_SHARD],
        "linked_shards": linked,
        "copied_shards": copied,
        "changed": len(native),
        "attached": True,
    }


def _verify_attached(ver: Verifier, family, native: dict[str, torch.Tensor], out_dir: Path) -> None:
    original = ver.checkpoint
    stitched = SafetensorsCheckpoint.open(out_dir)
    expected_map = {**original.weight_map, **dict.fromkeys(native, ATTACHED_SHARD)}
    if stitched.weight_map != expected_map:
        raise CheckpointError("attach verification failed: the index does not list the verifier's and head's tensors.")
    for key, shard in expected_map.items():
        new = stitched.get(key)
        expected = native[key] if key in native else original.get(key)
        if not _same_bits(new, expected):
            what = "head tensor was not written" if key in native else "verifier tensor changed"
            raise CheckpointError(f"attach verification failed: {key} in {shard}: {what}.")
    before, after = read_config_dict(original.root), read_config_dict(out_dir)
    fields = family.attach_config_fields()
    if {k: v for k, v in after.items() if k not in fields} != {k: v for k, v in before.items() if k not in fields}:
        raise CheckpointError("attach verification failed: config.json changed beyond the MTP fields.")
    if any(after.get(k) != v for k, v in fields.items()):
        raise CheckpointError(f"attach verification failed: config.json lacks {fields}.")
    if original.index is None and not (out_dir / SINGLE_NAME).is_file():
        raise CheckpointError(f"attach verification failed: {SINGLE_NAME} is missing from the output.")

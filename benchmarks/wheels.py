"""The wheels the device machines need: check a carried set against the device image here, install it there.

The device machines have no network; what their image lacks travels as wheels in the git-ignored folders `.bench/whl`
and `.whl` (built by `benchmarks/device_wheels.sh`). Both commands resolve the `Requires-Dist` of the root packages,
transitively, against what is installed (the image) and the carried wheels: a requirement that the installed version
meets uses it; otherwise the newest carried wheel that meets every requirement on that name is taken (a folder may
hold alternatives: two `datasets` for an older or newer pyarrow, a newer `typing-extensions` for an older image).

    # here, against the image's package list (names; versions where known):
    python3 benchmarks/wheels.py check --image benchmarks/device_image.txt --roots speculators,hs-connectors .bench/whl
    # on the device (prints what it installs; exit 1 and a `MISSING` line for every requirement nothing meets):
    python3 benchmarks/wheels.py install --target /tmp/site --roots speculators,hs-connectors .bench/whl
"""

from __future__ import annotations

import argparse
import email.parser
import importlib.metadata
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

UNKNOWN = "unknown"  # installed, version not known (the image list gives names only)


@dataclass(frozen=True)
class Wheel:
    name: str
    version: Version
    path: Path
    requires: tuple[Requirement, ...]

    def requirements(self, extras: set[str], env: dict[str, str]) -> list[Requirement]:
        """Requirements that apply on `env` for the base package and the requested extras."""
        out = []
        for req in self.requires:
            if req.marker is None or any(req.marker.evaluate({**env, "extra": extra}) for extra in {"", *extras}):
                out.append(req)
        return out


def read_wheels(folders: list[Path]) -> dict[str, list[Wheel]]:
    wheels: dict[str, list[Wheel]] = {}
    for folder in folders:
        for path in sorted(folder.glob("*.whl")):
            name, version, _, _ = parse_wheel_filename(path.name)
            with zipfile.ZipFile(path) as zf:
                meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
                message = email.parser.Parser().parsestr(zf.read(meta).decode("utf-8"))
            requires = tuple(Requirement(r) for r in message.get_all("Requires-Dist") or [])
            wheels.setdefault(canonicalize_name(name), []).append(
                Wheel(canonicalize_name(name), version, path, requires)
            )
    return wheels


@dataclass
class Resolution:
    chosen: dict[str, Wheel] = field(default_factory=dict)  # to install
    installed: dict[str, str] = field(default_factory=dict)  # name -> installed version it uses
    missing: list[str] = field(default_factory=list)  # requirements nothing meets
    assumed: list[str] = field(default_factory=list)  # met by an installed package of unknown version

    @property
    def ok(self) -> bool:
        return not self.missing


def resolve(
    roots: list[str], wheels: dict[str, list[Wheel]], installed: dict[str, Version | str], env: dict[str, str]
) -> Resolution:
    """Pick, for every name the roots need, the installed version or a carried wheel (fixed point over choices).
    A carried wheel whose own requirements nothing meets is dropped for its next older alternative."""
    chosen: dict[str, Wheel] = {}
    dropped: set[Path] = set()
    for _ in range(100):
        needs: dict[str, list[tuple[SpecifierSet, Wheel | None]]] = {
            canonicalize_name(r): [(SpecifierSet(), None)] for r in roots
        }
        extras: dict[str, set[str]] = {}
        for wheel in chosen.values():
            for req in wheel.requirements(extras.get(wheel.name, set()), env):
                name = canonicalize_name(req.name)
                needs.setdefault(name, []).append((req.specifier, wheel))
                extras.setdefault(name, set()).update(req.extras)
        result = Resolution()
        culprits: set[Path] = set()
        for name, specs in sorted(needs.items()):
            have = installed.get(name)
            if have is not None and (have == UNKNOWN or all(s.contains(have, prereleases=True) for s, _ in specs)):
                result.installed[name] = str(have)
                bounds = [f"{s} ({_label(by)})" for s, by in specs if str(s)]
                if have == UNKNOWN and bounds:
                    result.assumed.append(f"{name}: image version unknown; needs {', '.join(bounds)}")
                continue
            options = [w for w in wheels.get(name, []) if w.path not in dropped]
            fits = [w for w in options if all(s.contains(w.version, prereleases=True) for s, _ in specs)]
            if fits:
                result.chosen[name] = max(fits, key=lambda w: w.version)
                continue
            carried = ", ".join(str(w.version) for w in wheels.get(name, [])) or "none"
            wanted = "; ".join(f"{s or 'any'} ({_label(by)})" for s, by in specs)
            result.missing.append(f"{name}: needs {wanted}; installed {have or 'no'}; carried {carried}")
            culprits.update(by.path for s, by in specs if by is not None and str(s))
        retry = {p for p in culprits if any(w.path != p and w.path not in dropped for w in wheels[_name_of(p, wheels)])}
        if retry:
            dropped |= retry
            chosen = {n: w for n, w in result.chosen.items() if w.path not in retry}
            continue
        if result.chosen == chosen:
            return result
        chosen = result.chosen
    raise RuntimeError("the choice of wheels did not settle")


def _label(wheel: Wheel | None) -> str:
    return "root" if wheel is None else f"{wheel.name} {wheel.version}"


def _name_of(path: Path, wheels: dict[str, list[Wheel]]) -> str:
    return next(name for name, options in wheels.items() if any(w.path == path for w in options))


def image_list(path: Path) -> dict[str, Version | str]:
    out: dict[str, Version | str] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            out[canonicalize_name(name)] = Version(version) if version else UNKNOWN
    return out


def current_installed() -> dict[str, Version | str]:
    out: dict[str, Version | str] = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            out.setdefault(canonicalize_name(name), Version(dist.version))
    return out


def device_env(python: str) -> dict[str, str]:
    env = default_environment()
    env.update(python_version=python, python_full_version=f"{python}.3", sys_platform="linux",
               platform_system="Linux", platform_machine="x86_64", os_name="posix",
               implementation_name="cpython", platform_python_implementation="CPython")  # fmt: skip
    return env


def report(result: Resolution, wheels: dict[str, list[Wheel]]) -> None:
    for name, wheel in sorted(result.chosen.items()):
        print(f"carry   {name}=={wheel.version}  ({wheel.path.name})")
    for line in result.assumed:
        print(f"assumed {line}")
    used = {w.path for w in result.chosen.values()}
    for name, options in sorted(wheels.items()):
        for wheel in options:
            if wheel.path not in used:
                print(
                    f"unused  {wheel.path.name} (an alternative; {name} {result.installed.get(name, 'from another wheel')})"
                )
    for line in result.missing:
        print(f"MISSING {line}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("check", "install"))
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--roots", required=True, help="comma-separated packages the folder is carried for")
    parser.add_argument("--image", type=Path, help="check: the device image's package list (name or name==version)")
    parser.add_argument("--python", default="3.12", help="check: the device's Python version")
    parser.add_argument("--target", help="install: folder to install the chosen wheels into (pip --target)")
    args = parser.parse_args()
    roots = [r.strip() for r in args.roots.split(",") if r.strip()]
    wheels = read_wheels(args.folders)
    if args.command == "check":
        installed = image_list(args.image) if args.image else {}
        result = resolve(roots, wheels, installed, device_env(args.python))
        report(result, wheels)
        size = sum(p.stat().st_size for f in args.folders for p in f.glob("*.whl"))
        print(
            f"{'OK' if result.ok else 'INCOMPLETE'}: {len(result.chosen)} wheels to install, {size / 2**20:.1f} MiB carried"
        )
        return 0 if result.ok else 1
    if not args.target:
        parser.error("install needs --target")
    result = resolve(roots, wheels, current_installed(), default_environment())
    report(result, wheels)
    if result.chosen:
        paths = [str(w.path) for _, w in sorted(result.chosen.items())]
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--upgrade",
               "--disable-pip-version-check", "--target", args.target, *paths]  # fmt: skip
        if subprocess.call(cmd) != 0:
            print(f"MISSING pip failed installing {len(paths)} wheels into {args.target}")
            return 1
    print(f"{'installed' if result.ok else 'INCOMPLETE'}: {len(result.chosen)} wheels into {args.target}")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())

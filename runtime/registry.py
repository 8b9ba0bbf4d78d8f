"""Finds model packages: every `models/<name>/` directory whose __init__ exports PACKAGE."""
from __future__ import annotations

import contextlib
import importlib
import pkgutil
from typing import Iterator

from runtime.package import ModelPackage

_MODELS_ROOT = "models"


def discover() -> dict[str, ModelPackage]:
    """All packages, by name. Imported fresh each call is unnecessary: the import system caches modules."""
    root = importlib.import_module(_MODELS_ROOT)
    packages: dict[str, ModelPackage] = {}
    for info in sorted(pkgutil.iter_modules(root.__path__), key=lambda i: i.name):
        if not info.ispkg:
            continue
        module = importlib.import_module(f"{_MODELS_ROOT}.{info.name}")
        package = getattr(module, "PACKAGE", None)
        if isinstance(package, ModelPackage):
            packages[package.name] = package
    return packages


def _normalize(name: str) -> str:
    return name.lower().replace("-", "_")


def get_package(name: str) -> ModelPackage:
    """By package name or alias (dashes and underscores are the same: `my-model` == `my_model`)."""
    packages = discover()
    wanted = _normalize(name)
    for package in packages.values():
        if wanted in {_normalize(package.name), *map(_normalize, package.aliases)}:
            return package
    raise ValueError(f"unknown architecture {name!r}; known: {', '.join(sorted(packages)) or 'none'}")


def package_for_architectures(architectures: list[str]) -> ModelPackage:
    """By a checkpoint's config.json "architectures" list."""
    packages = discover()
    for arch in architectures:
        for package in packages.values():
            if arch in package.hf_architectures:
                return package
    raise ValueError(
        f"no model package serves architectures {architectures}; "
        f"packages: {', '.join(f'{p.name} {list(p.hf_architectures)}' for p in packages.values())}")


@contextlib.contextmanager
def explain_wrong_architecture(package: ModelPackage, hf_config, path) -> Iterator[None]:
    """Turn a failure to build or load a checkpoint whose config.json names architectures the package does
    not serve into a ValueError that says so (a package may still be forced on such a checkpoint, e.g. a
    copied package, as long as it builds)."""
    try:
        yield
    except ValueError:
        raise
    except Exception as exc:
        architectures = getattr(hf_config, "architectures", None) or []
        if not architectures or set(architectures) & set(package.hf_architectures):
            raise
        try:
            right = f"run `run-model {package_for_architectures(architectures).name} ...`, or "
        except ValueError:
            right = ""
        raise ValueError(f"the checkpoint at {path} is a {', '.join(architectures)}, not {package.name} "
                         f"({', '.join(package.hf_architectures)}), and building it failed ({type(exc).__name__}: "
                         f"{exc}); {right}leave the architecture out to take it from config.json") from None

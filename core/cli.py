"""The ``semantic`` command: serve a pipeline, validate pipeline files, print the schema."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from .config import ConfigError, PipelineConfig, json_schema, load_pipeline
from .plugin_manager import Registry

DEFAULT_PIPELINE = "default"


def resolve_pipeline(ref: str) -> Path:
    """A pipeline file path, or the name of a shipped pipeline (``default``, ``claude-code``...)."""
    from semantic.pipelines import shipped

    path = Path(ref)
    if path.exists() or ref.endswith((".yaml", ".yml")) or "/" in ref:
        return path
    pipelines = shipped()
    if ref in pipelines:
        return pipelines[ref]
    raise SystemExit(f"semantic: no pipeline file or shipped pipeline named {ref!r} (shipped: {', '.join(sorted(pipelines))})")


def _load(ref: str, registry: Registry) -> tuple[PipelineConfig, Path]:
    path = resolve_pipeline(ref)
    try:
        return load_pipeline(path, registry), path
    except ConfigError as e:
        print(e, file=sys.stderr)
        raise SystemExit(1) from None


def cmd_serve(args: argparse.Namespace) -> int:
    import trio

    from .blas import loaded_blas, loaded_skinny_gemm
    from .server import serve

    blas, skinny = loaded_blas(), loaded_skinny_gemm()
    log = logging.getLogger("semantic")
    log.info("BLAS: %s", f"OpenBLAS ({blas})" if blas else "MLX's reference BLAS (on Linux, apt-get install libopenblas0-pthread: ~10x faster prefill)")
    if sys.platform == "linux":
        log.info("skinny GEMM: %s", skinny or "not loaded (`semantic blas` says why)")

    registry = Registry.from_plugins()
    config, path = _load(args.pipeline, registry)
    server = config.server.model_copy(
        update={k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    )
    config = config.model_copy(update={"server": server})
    trio.run(lambda: serve(config, registry, base_dir=path.parent))
    # Shut down cleanly: the pipeline is closed, caches are flushed, files are closed. Leave now,
    # without the interpreter's teardown: MLX's C++ threads can still be joinable when their
    # statics are destroyed, which sometimes aborts the process ("terminate called without an
    # active exception", exit -6) after a clean shutdown.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def cmd_validate(args: argparse.Namespace) -> int:
    registry = Registry.from_plugins()
    failed = False
    for ref in args.files:
        path = resolve_pipeline(ref)
        try:
            load_pipeline(path, registry)
            print(f"{path}: OK")
        except ConfigError as e:
            failed = True
            print(f"{path}: {len(e.issues)} error{'s' if len(e.issues) != 1 else ''}")
            for issue in e.issues:
                print(f"  {issue}")
    return 1 if failed else 0


def cmd_schema(_args: argparse.Namespace) -> int:
    print(json.dumps(json_schema(Registry.from_plugins()), indent=2))
    return 0


def cmd_list(_args: argparse.Namespace) -> int:
    from semantic.pipelines import shipped

    for name, path in sorted(shipped().items()):
        print(f"{name}\t{path}")
    return 0


def cmd_plugins(_args: argparse.Namespace) -> int:
    reg = Registry.from_plugins()
    for title, table in (("stages", reg.stages), ("model loaders", reg.loaders), ("protocols", reg.protocols), ("eviction policies", reg.policies)):
        print(f"{title}:")
        for name, obj in sorted(table.items()):
            doc = getattr(obj, "description", "") or (getattr(obj, "__doc__", "") or "").strip().split("\n")[0]
            print(f"  {name}\t{doc}")
    return 0


def cmd_blas(_args: argparse.Namespace) -> int:
    from .blas import find_openblas, loaded_blas, loaded_skinny_gemm, skinny_gemm

    lib, why = skinny_gemm()
    print(f"preload: {find_openblas() or 'none'}")
    print(f"loaded: {loaded_blas() or 'reference'}")
    print(f"skinny GEMM: {lib or 'none'} ({why})")
    print(f"skinny GEMM loaded: {loaded_skinny_gemm() or 'no'}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="semantic", description="Local LLM server of typed trio stages; agents resume warm.")
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING... (default INFO)")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="serve a pipeline over HTTP")
    s.add_argument("--pipeline", default=DEFAULT_PIPELINE, help="pipeline YAML file or shipped name (default: default)")
    s.add_argument("--host", help="address to bind (default from the pipeline: 127.0.0.1)")
    s.add_argument("--port", type=int, help="port (default from the pipeline: 8000; 0 = any free port)")
    s.set_defaults(func=cmd_serve)

    pl = sub.add_parser("pipelines", help="pipeline definitions").add_subparsers(dest="action", required=True)
    v = pl.add_parser("validate", help="check pipeline files; print OK or every error with its location")
    v.add_argument("files", nargs="+", metavar="FILE")
    v.set_defaults(func=cmd_validate)
    pl.add_parser("schema", help="print the JSON Schema of pipeline files (installed plugins)").set_defaults(func=cmd_schema)
    pl.add_parser("list", help="list shipped pipelines").set_defaults(func=cmd_list)

    sub.add_parser("plugins", help="list what the installed plugins register").set_defaults(func=cmd_plugins)
    sub.add_parser("blas", help="which BLAS and skinny GEMM the server preloads (SEMANTIC_BLAS, SEMANTIC_SKINNY_GEMM) and uses").set_defaults(func=cmd_blas)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    if args.command in ("serve", "blas"):
        from .blas import ensure_preloaded

        ensure_preloaded(argv)  # re-executes once with OpenBLAS and the skinny GEMM when they apply
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

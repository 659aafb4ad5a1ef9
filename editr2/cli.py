"""The `editr2` command line.

Each subcommand lives in its own module, which defines ``add_arguments(parser)`` and ``run(args) -> int`` and keeps
its heavy imports (diffusers, transformers, trl) inside ``run`` so that ``editr2 --help`` stays fast. The module's
docstring's first line is the subcommand's help.

This is the one place where the core (`editr2`) reaches an integration: the core commands that take a ``--model``
(``demo``, ``bench shapes``, ``bench mice``) load it with `model_loader` (the diffusers integration's
`load_bench_editor`), and ``edit`` is the diffusers integration's own command.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# (command path) -> module implementing it
COMMANDS: dict[tuple[str, ...], str] = {
    ("demo",): "editr2.demo",
    ("edit",): "diffusers_editr2.cli",
    ("bench", "shapes"): "editr2.bench.shapes_cli",
    ("bench", "mice"): "editr2.bench.mice_cli",
    ("bench", "intent"): "editr2.bench.intent_cli",
    ("bench", "compare"): "editr2.bench.compare_cli",
    ("plan",): "trl_editr2.plan_cli",
}


def model_loader():
    """`diffusers_editr2.bench.load_bench_editor`, how the core commands load a ``--model`` (imported only then, so
    that the core itself imports no integration)."""
    try:
        from diffusers_editr2.bench import load_bench_editor
    except ImportError as err:
        raise SystemExit(f"--model needs the diffusers integration: pip install 'editr2[diffusers]' ({err}).") from None
    return load_bench_editor


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="editr2", description="Edit-R2: context-aware multi-turn image editing.")
    groups: dict[tuple[str, ...], argparse._SubParsersAction] = {(): parser.add_subparsers(dest="command", required=True)}
    for path, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        for depth in range(1, len(path)):
            prefix = path[:depth]
            if prefix not in groups:
                sub = groups[prefix[:-1]].add_parser(prefix[-1], help=f"{' '.join(prefix)} subcommands")
                groups[prefix] = sub.add_subparsers(dest="_".join(prefix) + "_command", required=True)
        doc = (module.__doc__ or "").strip().splitlines()
        sub = groups[path[:-1]].add_parser(path[-1], help=doc[0] if doc else None, description=module.__doc__,
                                           formatter_class=argparse.RawDescriptionHelpFormatter)  # keep its layout
        module.add_arguments(sub)
        sub.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

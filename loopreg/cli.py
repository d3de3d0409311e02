"""The ``loopreg`` console script: one subcommand per tool, each in the module that owns it.

    loopreg train recipes/loop_12x2.yaml max_duration=10ba
    loopreg demo --out runs/demo

A user error (:class:`~loopreg.errors.UserError`, raised by any command) is caught here, in one place: it prints
one line to stderr and exits 2 (no traceback unless ``LOOPREG_DEBUG=1``). Any other exception is a bug and keeps
its traceback.
"""

from __future__ import annotations

import importlib
import sys

from loopreg.errors import UserError, report_user_error

# subcommand -> (module[:function], one-line help); the function (default `cli_main`) is `(argv: list[str]) -> int`.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("loopreg.train", "train a recipe: loopreg train RECIPE.yaml [key=value ...]"),
    "data": ("loopreg.data.cli", "text to MDS shards: prepare SRC --tokenizer TOK --seq-len N --out DIR"),
    "demo": ("loopreg.demo", "the CPU demo: (1⊗1) vs (1⊗L) vs (L⊗1) on a synthetic reasoning task"),
    "reproduce": ("loopreg.reproduce", "every row of the paper's synthetic tables at CPU-mini scale"),
    "eval": ("loopreg.evals.cli", "grouped downstream eval (lm-eval): MODEL --groups ... [--loops 1,2] --out r.json"),
    "lm-eval": ("loopreg.evals.cli:lm_eval_alias_main", "the old name of `loopreg eval` (goes in the next release)"),
    "report": ("loopreg.evals.report", "paper-style tables, % Gap and the depth scaling law from results JSONs"),
    "similarity": ("loopreg.similarity", "how close to looped: per-group block cosines R_G of a model"),
    "snap": ("loopreg.snap", "tie an untied model's blocks exactly: CKPT -> looped LoopedLM folder"),
    "surgery": ("loopreg.surgery.cli",
                "loop an existing checkpoint: SRC --spec \"4x(1,4,1)\" [--layers ...] --out DIR"),
    "layers": ("loopreg.surgery.layers_cli",
               "per-layer angular distance, the ETD split and a keep-all spec: SRC --text FILE"),
    "export": ("loopreg.surgery.export",
               "write a looped model as a standard unrolled HF checkpoint: CKPT --unroll --out DIR"),
}


def usage() -> str:
    lines = ["usage: loopreg COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<11} {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Dispatch ``loopreg COMMAND ...``; exits with the command's status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        sys.exit(0 if args else 2)
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"error: unknown command '{name}'\n{usage()}", file=sys.stderr)
        sys.exit(2)
    module, _, function = COMMANDS[name][0].partition(":")
    entry = getattr(importlib.import_module(module), function or "cli_main")
    try:
        status = entry(rest)
    except UserError as err:
        status = report_user_error(err)
    sys.exit(status)


if __name__ == "__main__":
    main()

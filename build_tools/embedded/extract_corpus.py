"""Extract the embedded code corpus: instruction/response pairs from the Python standard library.

Every function and method of the standard library of the running Python (tests, demos and
vendored code left out) becomes one pair: the instruction is a request written from the
function's name, signature and docstring, the response is the function's source. Pairs are
deduplicated, then split by top-level package (never within one) into a training part and a
held-out evaluation part of a few hundred pairs. The output depends only on the stdlib of the
running Python version, which manifest.json records:

    python -m build_tools.embedded.extract_corpus [--out dresd_assets/corpus]
"""

import argparse
import ast
import gzip
import hashlib
import json
import shutil
import sys
import sysconfig
import textwrap
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

STDLIB = Path(sysconfig.get_paths()["stdlib"])
# Tests and demos are not library code; encodings is hundreds of near-identical codec tables;
# ensurepip and site-packages hold vendored or third-party code; pydoc_data is one data dict.
SKIP_DIRS = {"site-packages", "test", "tests", "idle_test", "turtledemo", "encodings", "ensurepip", "pydoc_data"}
MAX_CHARS = 1500  # instruction + response: about 500 tokens with the embedded tokenizer
MIN_LINES = 3  # def line + docstring alone is not a function worth learning
EVAL_PAIRS = 400  # eval packages are added (in a seeded order) until the eval part has this many
MAX_EVAL_PACKAGE = 80  # a bigger package stays in train, so no single package dominates eval
SPLIT_SEED = "dresd-embedded-v1"
OUT = Path(__file__).resolve().parents[2] / "dresd_assets" / "corpus"


def stdlib_modules(root: Path = STDLIB) -> list[tuple[str, Path]]:
    """(dotted module name, path) of every stdlib source file, sorted by module name."""
    modules = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if SKIP_DIRS & set(rel.parts[:-1]) or rel.name.startswith("_sysconfigdata"):
            continue
        if rel.parts[0].startswith("config-") or rel.name == "__main__.py":
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules.append((".".join(parts), path))
    return sorted(modules)


def _functions(body: list[ast.stmt], prefix: str = "") -> Iterator[tuple[str, ast.FunctionDef]]:
    """Module-level functions and methods of (nested) classes, with their qualified names.

    Definitions under `if`/`try` (platform variants) count; functions nested in functions do not.
    """
    for node in body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield prefix + node.name, node
        elif isinstance(node, ast.ClassDef):
            yield from _functions(node.body, f"{prefix}{node.name}.")
        elif isinstance(node, ast.If | ast.Try):
            for block in (node.body, node.orelse, *[h.body for h in getattr(node, "handlers", [])]):
                yield from _functions(block, prefix)


def _trivial(node: ast.FunctionDef) -> bool:
    """A body that is only a docstring, `pass`, `...` or `raise NotImplementedError` teaches nothing."""
    body = node.body[1:] if ast.get_docstring(node) is not None else node.body
    for stmt in body:
        if isinstance(stmt, ast.Pass) or (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant)):
            continue
        if isinstance(stmt, ast.Raise) and "NotImplementedError" in ast.unparse(stmt):
            continue
        return False
    return True


def _pick(key: str, options: tuple[str, ...]) -> str:
    """A stable (hash-seed independent) choice among phrasings, so instructions vary but reproduce."""
    return options[int(hashlib.sha256(key.encode()).hexdigest(), 16) % len(options)]


def make_instruction(module: str, qualname: str, node: ast.FunctionDef) -> str:
    """A request for `node` written from its name, signature and docstring."""
    signature = f"{node.name}({ast.unparse(node.args)})"
    if node.returns is not None:
        signature += f" -> {ast.unparse(node.returns)}"
    kind = "async function" if isinstance(node, ast.AsyncFunctionDef) else "function"
    owner = qualname.rpartition(".")[0]
    if owner:
        kind = kind.replace("function", "method")
        where = f"of class `{owner}` in the `{module}` module"
    else:
        where = f"from the `{module}` module"
    request = _pick(
        f"{module}:{qualname}",
        (
            f"Write the Python {kind} `{signature}` {where}.",
            f"Implement the {kind} `{signature}` {where}.",
            f"Define `{signature}`, the {kind} {where}.",
        ),
    )
    doc = ast.get_docstring(node)
    if doc:
        request += _pick(qualname, ("\n\nIts docstring:\n", "\n\nWhat it does:\n", "\n\nSpecification:\n"))
        request += doc.strip()
    return request


def extract_module(module: str, source: str) -> list[dict]:
    """Pairs (rows) for every non-trivial function and method in one module's source, in file order."""
    try:
        tree = ast.parse(source)
    except SyntaxError:  # lib2to3 test fixtures and the like: not Python 3 library code
        return []
    lines = source.splitlines()
    rows = []
    for qualname, node in _functions(tree.body):
        first = min([node.lineno] + [d.lineno for d in node.decorator_list])
        response = textwrap.dedent("\n".join(lines[first - 1 : node.end_lineno])).strip("\n")
        if response.count("\n") + 1 < MIN_LINES or _trivial(node):
            continue
        try:  # a def sharing its first or last line with other code does not slice cleanly
            ast.parse(response)
        except SyntaxError:
            continue
        instruction = make_instruction(module, qualname, node)
        if len(instruction) + len(response) > MAX_CHARS:
            continue
        rows.append(
            {"module": module, "qualname": qualname, "lineno": node.lineno,
             "instruction": instruction, "response": response}
        )
    return rows


def extract(root: Path = STDLIB) -> list[dict]:
    """All pairs of the stdlib under `root`, deduplicated on response and on instruction (first kept)."""
    seen: set[str] = set()
    rows = []
    for module, path in tqdm(stdlib_modules(root), desc="extract", unit="module"):
        for row in extract_module(module, path.read_text(encoding="utf-8", errors="replace")):
            keys = {"r:" + row["response"], "i:" + row["instruction"]}
            if not keys & seen:
                seen |= keys
                rows.append(row)
    return rows


def package(module: str) -> str:
    """The split unit: the top-level package (`email` for `email.mime.text`)."""
    return module.split(".")[0]


def split(rows: list[dict], eval_pairs: int = EVAL_PAIRS) -> tuple[list[dict], list[dict]]:
    """Split by top-level package: packages join eval in a seeded hash order until it has `eval_pairs`."""
    sizes: dict[str, int] = {}
    for row in rows:
        sizes[package(row["module"])] = sizes.get(package(row["module"]), 0) + 1
    order = sorted(sizes, key=lambda p: hashlib.sha256(f"{SPLIT_SEED}:{p}".encode()).hexdigest())
    held_out: set[str] = set()
    total = 0
    for name in order:
        if total >= eval_pairs:
            break
        if sizes[name] <= MAX_EVAL_PACKAGE:
            held_out.add(name)
            total += sizes[name]
    train = [r for r in rows if package(r["module"]) not in held_out]
    evals = [r for r in rows if package(r["module"]) in held_out]
    return train, evals


def write_jsonl_gz(rows: list[dict], path: Path) -> None:
    """Byte-identical output for identical rows: no timestamp or file name in the gzip header."""
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", filename="", mtime=0) as gz:
        for row in rows:
            gz.write((json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n").encode())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--eval-pairs", type=int, default=EVAL_PAIRS)
    args = parser.parse_args()

    rows = extract()
    train, evals = split(rows, args.eval_pairs)
    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl_gz(train, args.out / "train.jsonl.gz")
    write_jsonl_gz(evals, args.out / "eval.jsonl.gz")
    shutil.copyfile(STDLIB / "LICENSE.txt", args.out / "LICENSE-PSF.txt")
    manifest = {
        "source": "Python standard library (PSF License, see LICENSE-PSF.txt)",
        "python_version": ".".join(map(str, sys.version_info[:3])),
        "pairs": len(rows),
        "train_pairs": len(train),
        "eval_pairs": len(evals),
        "eval_packages": sorted({package(r["module"]) for r in evals}),
        "max_chars": MAX_CHARS,
        "split_seed": SPLIT_SEED,
    }
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"{len(rows)} pairs: {len(train)} train, {len(evals)} eval -> {args.out}")


if __name__ == "__main__":
    main()

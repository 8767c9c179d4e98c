#!/usr/bin/env python3
"""Checks of what the production image (Dockerfile) ships, without building it.

The sandbox Blinger (`blinger-sandbox`) is a test tool whose `/_sandbox/config` answers with its
API token: it must not be built by the image's stages nor copied into the runtime stage. The
runtime stage must run the worker and nothing else.

    python3 .ci/image_checks.py [Dockerfile]
"""
from __future__ import annotations

import re
import sys
from pathlib import Path


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of each instruction, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    current = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        word, _, rest = current.partition(" ")
        out.append((word.upper(), rest.strip()))
        current = ""
    return out


def main() -> int:
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "Dockerfile")
    steps = instructions(path.read_text())
    problems: list[str] = []
    stages: list[list[tuple[str, str]]] = []
    for word, rest in steps:
        if word == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((word, rest))
    if not stages:
        problems.append("no FROM stage")
    # Every cargo build names the worker's binary (a bare build would build every [[bin]] of the
    # workspace, the sandbox's included) and only it. (The dependency layer still writes stubs for
    # the sandbox crate's sources: cargo loads every member's manifest, so their targets must exist.)
    for word, rest in steps:
        if word != "RUN":
            continue
        for command in re.split(r";|&&|\|\|", rest):
            if re.match(r"\s*(cp|mv|install|ln)\s", command) and "sandbox" in command:
                problems.append(f"a build step copies the sandbox: {command.strip()}")
            if "cargo build" not in command and "cargo install" not in command:
                continue
            bins = re.findall(r"--bin(?:=|\s+)(\S+)", command)
            if bins != ["blinger-worker"] or "--bins" in command:
                problems.append(f"a cargo build does not build exactly --bin blinger-worker: {command.strip()}")
    runtime = stages[-1] if stages else []
    for word, rest in runtime:
        if word in {"COPY", "ADD"} and "sandbox" in rest:
            problems.append(f"the runtime stage copies the sandbox: {word} {rest}")
        if word == "ENTRYPOINT" and not re.search(r"blinger-worker\"?\s*\]?$", rest):
            problems.append(f"the entrypoint is not the worker: {rest}")
    copies = [rest for word, rest in runtime if word == "COPY" and "/usr/local/bin" in rest]
    if not copies:
        problems.append("the runtime stage copies no binary into /usr/local/bin")
    for problem in problems:
        print(f"image_checks: {problem}", file=sys.stderr)
    if not problems:
        print("image_checks: the runtime image holds the worker only")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

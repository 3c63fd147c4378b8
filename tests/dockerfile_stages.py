"""The Dockerfile's build stages, read with dockerfile-parse (ARG defaults substituted in FROM)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from dockerfile_parse import DockerfileParser

DOCKERFILE = Path(__file__).resolve().parent.parent / "Dockerfile"


@dataclass
class Stage:
    name: str
    base: str  # an image, or an earlier stage's name
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def values(self, instruction: str) -> list[str]:
        return [value for kind, value in self.instructions if kind == instruction]

    def copies_from(self) -> list[str]:
        return [m.group(1) for v in self.values("COPY") if (m := re.match(r"--from=(\S+)", v))]


def read_stages(dockerfile: Path = DOCKERFILE) -> dict[str, Stage]:
    parser = DockerfileParser(path=str(dockerfile))
    stages: dict[str, Stage] = {}
    bases = iter(parser.parent_images)  # FROM images with the ARG defaults substituted
    current: Stage | None = None
    for entry in parser.structure:
        kind, value = entry["instruction"], entry["value"]
        if kind == "FROM":
            name = value.split()[-1] if " AS " in value.upper() else f"stage{len(stages)}"
            current = stages[name.lower()] = Stage(name.lower(), next(bases))
        elif current is not None and kind != "COMMENT":
            current.instructions.append((kind, value))
    return stages


def root_image(stages: dict[str, Stage], name: str) -> str:
    while stages[name].base in stages:
        name = stages[name].base
    return stages[name].base


def exec_form(value: str) -> list[str]:
    args = json.loads(value)
    assert isinstance(args, list) and all(isinstance(a, str) for a in args), value
    return args

"""DreamBench (DreamBooth's `dataset/` folder), read as published: one folder of photos per subject and
`prompts_and_classes.txt`, which holds the subject -> class table (a `subject_name,class` CSV block) and two
prompt lists ("Object Prompts", "Live Subject Prompts") written as Python lines
`'a {0} {1} in the jungle'.format(unique_token, class_token),`.

    bench = load_dreambench("dreambooth/dataset", subjects=["dog", "teapot"])
    for subject in bench.subjects: subject.prompts[0].text   # "a dog in the jungle"

Live subjects are the dogs and cats (DreamBooth's paper: "9 live subjects (dogs and cats)"); they get the
live-subject list. Each prompt is split for the pipeline's own prompt building, `"a {target} {prompt}"`: the
words between "a" and the unique token join the class in `target` ("a red {0} {1}" -> target "red dog",
prompt ""), so the text the model reads is the benchmark's prompt with the unique token dropped.
"""

from __future__ import annotations

import dataclasses
import os
import re

PROMPTS_FILE = "prompts_and_classes.txt"
LIVE_CLASSES = ("cat", "dog")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
_PROMPT_LINE = re.compile(r"""^\s*(['"])(?P<template>.*)\1\s*\.format\(\s*unique_token\s*,\s*class_token\s*\)\s*,?\s*$""")
_LISTS = {"object prompts": "object", "live subject prompts": "live"}


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One benchmark prompt for one subject. `template`: DreamBooth's line ("a {0} {1} in the jungle");
    `target` and `prompt`: what the pipeline gets (it writes "a {target} {prompt}"); `text`: that sentence,
    which CLIP-T scores against."""

    index: int
    template: str
    target: str
    prompt: str

    @property
    def text(self) -> str:
        return f"a {self.target} {self.prompt}".strip()

    @property
    def key(self) -> str:
        """The prompt without its subject, shared by every subject it is asked of ("a {class} in the jungle")."""
        return self.template.replace("{0} {1}", "{class}")


@dataclasses.dataclass(frozen=True)
class Subject:
    name: str
    class_name: str
    images: tuple[str, ...]  # the real photos, sorted by file name
    live: bool
    prompts: tuple[Prompt, ...]


@dataclasses.dataclass(frozen=True)
class DreamBench:
    root: str
    subjects: tuple[Subject, ...]
    prompt_lists: dict  # "object" / "live" -> DreamBooth's templates

    def subject(self, name: str) -> Subject:
        for subject in self.subjects:
            if subject.name == name:
                return subject
        raise KeyError(name)


def split_template(template: str, class_name: str, index: int = 0) -> Prompt:
    """DreamBooth's `'a {0} {1} ...'` as the pipeline's (target, prompt) with the unique token {0} dropped."""
    if template.count("{0} {1}") != 1 or template.count("{") != 2:
        raise ValueError(f"prompt {template!r}: expected one '{{0}} {{1}}' (unique token, class) and no other field")
    before, after = template.split("{0} {1}")
    words = before.split()
    if not words or words[0].lower() != "a":
        raise ValueError(f"prompt {template!r}: expected it to start with 'a ' (the pipeline writes \"a {{target}} {{prompt}}\")")
    return Prompt(index=index, template=template, target=" ".join(words[1:] + [class_name]), prompt=after.strip())


def parse_prompts_and_classes(text: str, source: str = PROMPTS_FILE) -> tuple[dict, dict]:
    """({subject: class}, {"object": [template, ...], "live": [...]}) from the file's text."""
    classes, lists = {}, {"object": [], "live": []}
    section, current = None, None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        lowered = line.lower()
        if not line:
            continue
        if lowered == "classes":
            section, current = "classes", None
        elif lowered == "prompts":
            section = "prompts"
        elif lowered in _LISTS:
            section, current = "prompts", _LISTS[lowered]
        elif section == "classes":
            if lowered.replace(" ", "") == "subject_name,class":
                continue
            name, comma, class_name = line.partition(",")
            if not comma or not name.strip():
                raise ValueError(f"{source}:{number}: expected 'subject_name,class', got {line!r}")
            if not class_name.strip():
                raise ValueError(f"{source}:{number}: subject {name.strip()!r} has no class")
            classes[name.strip()] = class_name.strip()
        elif section == "prompts" and current is not None:
            match = _PROMPT_LINE.match(line)
            if match:
                lists[current].append(match.group("template"))
            elif not (line.startswith("prompt_list") or line in ("]", "[")):
                raise ValueError(f"{source}:{number}: not a prompt line of the form "
                                 f"'a {{0}} {{1}} ...'.format(unique_token, class_token): {line!r}")
    if not classes:
        raise ValueError(f"{source}: no subject -> class table (a 'Classes' section with 'subject_name,class' lines)")
    for kind, heading in (("object", "Object Prompts"), ("live", "Live Subject Prompts")):
        if not lists[kind]:
            raise ValueError(f"{source}: no '{heading}' list")
    return classes, lists


def subject_images(folder: str) -> tuple[str, ...]:
    return tuple(sorted(os.path.join(folder, name) for name in os.listdir(folder)
                        if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")))


def load_dreambench(root: str, subjects=None) -> DreamBench:
    """Read DreamBooth's dataset folder. `subjects`: names to keep (default: every subject of the class table,
    in its order). Raises FileNotFoundError for a missing file or folder, ValueError for a subject without a
    class or without photos."""
    root = os.path.abspath(os.fspath(root))
    if not os.path.isdir(root):
        raise FileNotFoundError(f"--dreambench: no folder {root}")
    path = os.path.join(root, PROMPTS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--dreambench: {root} has no {PROMPTS_FILE} (the subject -> class table and the prompt "
                                f"lists of DreamBooth's dataset/ folder)")
    with open(path, encoding="utf-8") as f:
        classes, lists = parse_prompts_and_classes(f.read(), path)
    folders = sorted(name for name in os.listdir(root) if os.path.isdir(os.path.join(root, name)) and not name.startswith("."))
    unclassed = [name for name in folders if name not in classes]
    if unclassed:
        raise ValueError(f"--dreambench: subject folder(s) {', '.join(unclassed)} have no class in {PROMPTS_FILE}")
    names = list(classes) if subjects is None else list(subjects)
    unknown = [name for name in names if name not in classes]
    if unknown:
        raise ValueError(f"--subjects: {', '.join(unknown)} not in {PROMPTS_FILE} (subjects: {', '.join(classes)})")
    if len(set(names)) != len(names):
        raise ValueError(f"--subjects: a subject is named twice in {', '.join(names)}")
    chosen = []
    for name in names:
        folder = os.path.join(root, name)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"--dreambench: subject {name!r} has no folder {folder}")
        images = subject_images(folder)
        if not images:
            raise ValueError(f"--dreambench: {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        live = classes[name] in LIVE_CLASSES
        prompts = tuple(split_template(t, classes[name], i) for i, t in enumerate(lists["live" if live else "object"]))
        chosen.append(Subject(name, classes[name], images, live, prompts))
    return DreamBench(root, tuple(chosen), lists)

